"""gunicorn settings for the ingress (`--config python:ingress.gunicorn_conf`),
taken from payfleet's settings like everything else.

Workers count with prometheus-client's multiprocess mode. prometheus-client
picks its storage from `PROMETHEUS_MULTIPROC_DIR` when first imported, so
this hook translates the setting into that variable here, in the master,
before anything imports it (hence the late import below)."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from payfleet.platform import logs
from payfleet.platform.config import load_settings

_settings = load_settings()
# A directory of this run's own unless the operator names one; removed on exit.
_own_metrics_dir = not _settings.prometheus_multiproc_dir
_metrics_dir = _settings.prometheus_multiproc_dir or tempfile.mkdtemp(prefix="payfleet-ingress-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir

workers = _settings.web_concurrency
# Threads, so that a checkout waiting on a slow provider, or a slow client,
# holds one thread and not a whole worker: webhooks keep being answered.
# Idle keep-alive connections wait in each worker's poller; a new connection
# holds a thread for up to 5 s before its first byte (then it is parked in
# the poller too), hence many threads: idle ones cost no CPU.
worker_class = "gthread"
threads = _settings.web_threads
# Webhooks and checkouts answer in well under this; a hung worker is recycled.
timeout = 30
graceful_timeout = 20
keepalive = 5
accesslog = "-"
errorlog = "-"
# gunicorn's error and access logs and the app's own lines, all through the
# one payfleet handler on stderr: JSON lines unless on a terminal (LOG_FORMAT).
logconfig_dict = logs.gunicorn_logconfig("ingress", _settings.log_format)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


# gunicorn's control socket has one default path per user, so two ingresses
# on one machine (or a test run beside a running fleet) would collide.
control_socket_disable = True


def on_exit(server: Any) -> None:
    if _own_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
