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
from payfleet.platform.metrics_endpoint import serve_metrics

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
    # Imported here, like Dramatiq's exporter: this process only reads the
    # workers' multiprocess files.
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    settings = load_settings()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=prometheus.DB_PATH)  # type: ignore[no-untyped-call]
    port = settings.worker_metrics_port
    if serve_metrics("worker", settings.metrics_host, port, "WORKER_METRICS_PORT", registry):
        threading.Event().wait()
    return 0


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
