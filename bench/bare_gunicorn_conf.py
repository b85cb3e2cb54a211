"""gunicorn settings of the bare endpoint: the ingress's own (worker count
and class, timeouts, keep-alive, access log and its format: JSON lines, as
the ingress writes them when not on a terminal), mirrored by hand so the
reference runs under the same server."""

from __future__ import annotations

import os

from payfleet.platform import logs

workers = int(os.environ.get("WEB_CONCURRENCY") or "2")
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS") or "64")
timeout = 30
graceful_timeout = 20
keepalive = 5
accesslog = "-"
errorlog = "-"
logconfig_dict = logs.gunicorn_logconfig("bare", os.environ.get("LOG_FORMAT", ""))
control_socket_disable = True
