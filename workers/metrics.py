"""Worker metrics. Created on first use, never at import: Dramatiq's
Prometheus middleware points prometheus-client at its multiprocess directory
when a worker process boots, and prometheus-client picks its storage when a
metric is first created, so a metric made at import would never be exported."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import cache
from typing import Any

from dramatiq.middleware import prometheus

from payfleet.platform.config import load_settings

log = logging.getLogger(__name__)


class WorkerMetrics(prometheus.Prometheus):
    """Dramatiq's Prometheus middleware with an exporter that shares a host.

    Dramatiq's own exporter (a fork of the worker's parent) dies with a
    traceback when its port is taken, e.g. by a second `payfleet worker` on
    the same host. This one serves the same multiprocess directory on
    WORKER_METRICS_PORT, and when it cannot, says so in one warning and leaves
    the worker consuming: metrics are worth less than the work."""

    @property
    def forks(self) -> list[Callable[[], int]]:
        return [serve_worker_metrics]


def serve_worker_metrics() -> int:
    """The exporter's process: serves until Dramatiq stops it (SIGTERM)."""
    settings = load_settings()
    if not settings.worker_metrics_port:
        return 0
    if not _listen(settings.metrics_host, settings.worker_metrics_port):
        return 0
    threading.Event().wait()
    return 0


def _listen(host: str, port: int) -> bool:
    # At runtime only, like Dramatiq's exporter: prometheus-client decides at
    # import whether it counts in files, and this process only reads them.
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=prometheus.DB_PATH)  # type: ignore[no-untyped-call]
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        log.warning(
            "worker metrics are OFF: cannot listen on %s:%d (WORKER_METRICS_PORT): %s; "
            "this worker runs on without its Prometheus endpoint. Give each worker on a host "
            "its own WORKER_METRICS_PORT, or 0 to turn metrics off.",
            host,
            port,
            error.strerror or error,
        )
        return False
    return True


@cache
def monetbil_disagreements() -> Any:
    from prometheus_client import Counter

    return Counter(
        "payfleet_monetbil_disagreements_total",
        "Monetbil callbacks claiming success that check-payment contradicted",
    )


@cache
def review_outcomes_unknown() -> Any:
    from prometheus_client import Counter

    return Counter(
        "payfleet_review_requests_outcome_unknown_total",
        "Review requests marked failed because whether WhatsApp accepted them is unknown (never resent)",
    )
