"""A process's Prometheus endpoint, on a port other replicas may hold."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def serve_metrics(role: str, host: str, port: int, setting: str, registry: Any = None) -> bool:
    """Start the endpoint; False when it is off (port 0) or could not be
    started. Replicas share a host and its ports: a port another process
    holds must not stop this one's work, so it runs on without metrics and
    says so once, naming the setting to change."""
    if not port:
        return False
    # Imported here: prometheus-client picks its storage (multiprocess files
    # or memory) when first imported, which must follow the process's set-up.
    from prometheus_client import REGISTRY, start_http_server

    try:
        start_http_server(port, addr=host, registry=REGISTRY if registry is None else registry)
    except OSError as error:
        log.warning(
            "%s metrics are OFF: cannot listen on %s:%d (%s): %s; this %s runs on without its "
            "Prometheus endpoint. Give each %s on a host its own %s, or 0 to turn metrics off.",
            role,
            host,
            port,
            setting,
            error.strerror or error,
            role,
            role,
            setting,
        )
        return False
    return True
