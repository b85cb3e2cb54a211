"""Wiring of the chaos suite: one fleet per module, started once (so the two
schedulers run for the whole run), its PostgreSQL and RabbitMQ behind TCP
proxies; the scale (short in `make test`, full in `make chaos`) from
CHAOS_SCALE."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from payfleet.platform.db import migrate
from tests.chaos.fleet import Fleet, fleet_env, proxies
from tests.conftest import (
    AMQP_HOST_PART,
    PG_ADMIN_URL,
    PG_HOST_PART,
    free_port,
    process_env,
)
from tests.fakes.stripe_server import FakeStripe


@dataclass(frozen=True)
class Scale:
    name: str
    broker_cut_seconds: float
    pg_cut_seconds: float
    orders: int  # per scenario that pays orders
    backlog: int  # events waiting when the worker is killed
    checkouts: int  # racing for the last units
    senders: int = 16


SCALES = {
    "full": Scale("full", broker_cut_seconds=20, pg_cut_seconds=10, orders=160, backlog=600, checkouts=200),
    "short": Scale("short", broker_cut_seconds=4, pg_cut_seconds=3, orders=36, backlog=120, checkouts=50),
}


@pytest.fixture(scope="session")
def scale() -> Scale:
    name = os.environ.get("CHAOS_SCALE", "short")
    if name not in SCALES:
        raise pytest.UsageError(f"CHAOS_SCALE must be one of {sorted(SCALES)}, not {name!r}")
    return SCALES[name]


@pytest.fixture(scope="module")
def chaos_stripe() -> Iterator[FakeStripe]:
    with FakeStripe() as fake:
        yield fake


def _base_env(database_url: str, broker_url: str, stripe: FakeStripe, metrics_port: int) -> dict[str, str]:
    """Test-speed settings, with retries that outlast a PostgreSQL cut: six
    attempts over 15.5 s, so an event caught by a 10 s cut is retried, not
    dead-lettered."""
    return {
        **process_env(database_url, broker_url, stripe.base_url, "http://127.0.0.1:9"),
        "WHATSAPP_API_BASE": "http://127.0.0.1:9",
        "EVENT_MAX_ATTEMPTS": "6",
        "EVENT_RETRY_DELAYS_SECONDS": "0.5,1,2,4,8",
        "EVENT_TIME_LIMIT_SECONDS": "20",
        "OUTBOX_RELAY_INTERVAL_SECONDS": "0.2",
        "OUTBOX_RELAY_GRACE_SECONDS": "0.5",
        # Both schedulers are replicas with one configuration, as on one host.
        "SCHEDULER_METRICS_PORT": str(metrics_port),
        # The stock jobs fire every 5 s and an order's window is 8 s, so during the
        # outages the expire job asks Stripe about orders being paid, pays those
        # that succeeded (racing their webhook) and expires the abandoned ones.
        "JOB_SCHEDULES": "expire-stale-orders=* * * * * */5;release-expired-reservations=* * * * * */5",
        "ORDER_PAYMENT_WINDOW_SECONDS": "8",
        "DB_POOL_SIZE": "6",
        "WEB_CONCURRENCY": "2",
        "PYTHONUNBUFFERED": "1",
    }


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def chaos_world() -> Iterator[tuple[str, str]]:
    """A database and a vhost of the fleet's own, for the whole module: the
    suite's per-test TRUNCATE would race (and deadlock with) a fleet that
    keeps running between scenarios, so the scenarios share one history and
    each uses SKUs of its own."""
    name = f"payfleet_chaos_{os.getpid()}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    database_url = f"{PG_HOST_PART}/{name}"
    try:
        migrate(database_url)
        yield database_url, f"{AMQP_HOST_PART}/{urllib.parse.quote(name, safe='')}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        _rabbitmqctl("delete_vhost", name)


@pytest.fixture(scope="module")
def fleet(
    request: pytest.FixtureRequest, chaos_world: tuple[str, str], chaos_stripe: FakeStripe
) -> Iterator[Fleet]:
    failed_before = request.session.testsfailed
    logs = Path(tempfile.mkdtemp(prefix="payfleet-chaos-"))
    database_url, broker_url = chaos_world
    base = _base_env(database_url, broker_url, chaos_stripe, free_port())
    with proxies() as (pg, amqp):
        running = Fleet(fleet_env(base, pg, amqp), logs, pg, amqp)
        try:
            running.spawn("scheduler-a", "scheduler")
            running.spawn("scheduler-b", "scheduler")
            running.start_worker()
            running.start_ingress()
            yield running
        finally:
            running.stop()
    if request.session.testsfailed == failed_before:
        shutil.rmtree(logs, ignore_errors=True)  # the logs of a failed run are kept for reading
    else:
        print(f"\nchaos: fleet logs in {logs}")
