"""Fleet-wide figures read from PostgreSQL whenever Prometheus scrapes the
scheduler: what the alert rules (deploy/prometheus/alerts.yml) watch and no
process counts as it happens. Every scheduler replica exports the same
figures, so the rules take their max.

- payfleet_events{status}: stored events `received` (not applied yet),
  `unmatched` and `failed`.
- payfleet_oldest_unapplied_event_age_seconds: age of the oldest `received`
  event (0 when there is none).
- payfleet_orders_needing_attention: orders in `needs_attention`.
- payfleet_job_runs_total{job, state}: recorded runs that `failed` or were
  `skipped` (a slot that did not run); rows are never deleted, so this
  only grows, like a counter.
- payfleet_fleet_gauges_up: 0 when PostgreSQL could not be read (the others
  are then left out rather than reported as zero).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from domain.models import Order, ProviderEvent, ScheduledRun

log = logging.getLogger(__name__)

EVENT_STATUSES = ("received", "unmatched", "failed")
RUN_STATES = ("failed", "skipped")


class FleetGauges(Collector):
    def __init__(self, sessions: sessionmaker[Session], jobs: Sequence[str]) -> None:
        # Every job's series exists from the start (at 0), so that the rules'
        # increase() sees a job's first failure too.
        self._sessions, self._jobs = sessions, tuple(jobs)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily(
            "payfleet_fleet_gauges_up", "1 when the fleet gauges could be read from PostgreSQL"
        )
        try:
            with self._sessions() as session:
                figures = list(self._read(session))
        except SQLAlchemyError as error:
            log.warning("fleet gauges not read: %s", type(error).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from figures

    def _read(self, session: Session) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        events = GaugeMetricFamily("payfleet_events", "Stored provider events by status", labels=["status"])
        counted = dict(
            session.execute(
                select(ProviderEvent.status, func.count())
                .where(ProviderEvent.status.in_(EVENT_STATUSES))
                .group_by(ProviderEvent.status)
            ).all()
        )
        for status in EVENT_STATUSES:
            events.add_metric([status], counted.get(status, 0))
        yield events

        oldest = session.execute(
            select(func.extract("epoch", func.now() - func.min(ProviderEvent.received_at))).where(
                ProviderEvent.status == "received"
            )
        ).scalar()
        yield GaugeMetricFamily(
            "payfleet_oldest_unapplied_event_age_seconds",
            "Age of the oldest stored event not applied yet",
            value=float(oldest or 0),
        )

        attention = session.execute(select(func.count()).where(Order.status == "needs_attention")).scalar()
        yield GaugeMetricFamily(
            "payfleet_orders_needing_attention", "Orders in needs_attention", value=attention or 0
        )

        runs = CounterMetricFamily(
            "payfleet_job_runs", "Job runs recorded failed or skipped", labels=["job", "state"]
        )
        recorded = {
            (job, state): count
            for job, state, count in session.execute(
                select(ScheduledRun.job, ScheduledRun.state, func.count())
                .where(ScheduledRun.state.in_(RUN_STATES))
                .group_by(ScheduledRun.job, ScheduledRun.state)
            ).all()
        }
        for job in sorted({*self._jobs, *(job for job, _ in recorded)}):
            for state in RUN_STATES:
                runs.add_metric([job, state], recorded.get((job, state), 0))
        yield runs
