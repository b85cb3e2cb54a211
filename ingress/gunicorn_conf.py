"""gunicorn settings for the ingress (`--config python:ingress.gunicorn_conf`).

Workers count with prometheus-client's multiprocess mode. prometheus-client
picks its storage when first imported, so the directory is set here, in the
master, before anything imports it (hence the late import below)."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

# A directory of this run's own unless the operator names one; removed on exit.
_own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="payfleet-ingress-metrics-")

workers = int(os.environ.get("WEB_CONCURRENCY") or "2")
worker_class = "sync"
# Webhooks and checkouts answer in well under this; a hung worker is recycled.
timeout = 30
graceful_timeout = 20
keepalive = 5
accesslog = "-"
errorlog = "-"


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


# gunicorn's control socket has one default path per user, so two ingresses
# on one machine (or a test run beside a running fleet) would collide.
control_socket_disable = True


def on_exit(server: Any) -> None:
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
