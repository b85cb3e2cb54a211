"""Worker metrics. Created on first use, never at import: Dramatiq's
Prometheus middleware points prometheus-client at its multiprocess directory
when a worker process boots, and prometheus-client picks its storage when a
metric is first created, so a metric made at import would never be exported."""

from __future__ import annotations

from functools import cache
from typing import Any


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
