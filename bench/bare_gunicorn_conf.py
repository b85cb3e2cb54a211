"""gunicorn settings of the bare endpoint: the ingress's own (worker count
and class, timeouts, keep-alive, access log to stdout), mirrored by hand so
the reference runs under the same server."""

from __future__ import annotations

import os

workers = int(os.environ.get("WEB_CONCURRENCY") or "2")
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS") or "64")
timeout = 30
graceful_timeout = 20
keepalive = 5
accesslog = "-"
errorlog = "-"
control_socket_disable = True
