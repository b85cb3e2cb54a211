"""The scheduler process: ticks every few seconds until told to stop.

Each tick runs the periodic tasks; today that is the outbox relay, and the
maintenance jobs slot in beside it. Any number of replicas may run: each task
takes its work with row locks or unique claims, never by being alone."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence

from prometheus_client import REGISTRY

from payfleet.platform.broker import build_broker
from payfleet.platform.config import Settings, job_table
from payfleet.platform.db import engine_for, make_sessions
from payfleet.platform.metrics_endpoint import serve_metrics
from payfleet.platform.publishing import Publisher
from schedules.claims import claimer_for
from schedules.fleet_gauges import FleetGauges
from schedules.relay import OutboxRelay

log = logging.getLogger(__name__)

Task = Callable[[], object]


def run(tasks: Sequence[Task], interval: float, stop: threading.Event) -> None:
    """Run every task each `interval` seconds until `stop` is set. A failing
    task is logged and tried again next tick; it never stops the others."""
    while not stop.is_set():
        for task in tasks:
            try:
                task()
            except Exception:
                log.exception(
                    "scheduler task %s failed; retrying next tick", getattr(task, "__qualname__", task)
                )
        stop.wait(interval)


def tasks_for(settings: Settings) -> list[Task]:
    sessions = make_sessions(engine_for(settings, pool_size=2))
    # What the alert rules watch, read from PostgreSQL at each scrape.
    REGISTRY.register(FleetGauges(sessions, [job.name for job in job_table(settings).jobs]))
    # One broker connection for both tasks: they run on the same thread.
    publisher = Publisher(build_broker(settings))
    relay = OutboxRelay(
        sessions,
        publisher,
        grace=settings.outbox_relay_grace_seconds,
        stuck_after=settings.outbox_stuck_after_seconds,
    )
    return [relay.run_once, claimer_for(settings, sessions, publisher).run_once]


def main(settings: Settings) -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    serve_metrics(
        "scheduler", settings.metrics_host, settings.scheduler_metrics_port, "SCHEDULER_METRICS_PORT"
    )
    log.info("scheduler started (tick %.1f s)", settings.outbox_relay_interval_seconds)
    run(tasks_for(settings), settings.outbox_relay_interval_seconds, stop)
    log.info("scheduler stopped")
