"""gunicorn settings for the ingress (`--config python:ingress.gunicorn_conf`).

Workers count with prometheus-client's multiprocess mode: the directory must
be set before any worker imports the app, so it is set here, in the master."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from prometheus_client import multiprocess

os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="payfleet-ingress-metrics-"))

workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "sync"
# Webhooks and checkouts answer in well under this; a hung worker is recycled.
timeout = 30
graceful_timeout = 20
keepalive = 5
accesslog = "-"
errorlog = "-"


def child_exit(server: Any, worker: Any) -> None:
    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
