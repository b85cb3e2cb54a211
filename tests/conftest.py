"""Test wiring: a PostgreSQL database and a RabbitMQ vhost of the run's own
(created here, removed at the end, so a running fleet is untouched), the real
stripe library pointed at a fake Stripe server on 127.0.0.1, and real Dramatiq
workers consuming from the test vhost."""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import psycopg
import pytest
import requests
from falcon import testing
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from bench.procs import stop_groups
from domain.models import Base
from ingress.app import Collaborators, collaborators, create_app
from payfleet.platform.broker import build_broker
from payfleet.platform.config import Settings, load_settings
from payfleet.platform.db import make_engine, make_sessions, migrate
from tests.fakes.monetbil_server import FakeMonetbil
from tests.fakes.stripe_server import FakeStripe
from tests.fakes.whatsapp_server import ACCOUNT_SID, AUTH_TOKEN, SENDER, FakeWhatsApp
from workers.apply_events import declare_event_actors
from workers.job_runner import declare_job_actors, job_gateways

PG_ADMIN_URL = os.environ.get("PAYFLEET_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_HOST_PART = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
AMQP_HOST_PART = os.environ.get("PAYFLEET_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")
ADMIN_TOKEN = "test-admin-token"
WEBHOOK_SECRETS = ("whsec_test_current", "whsec_test_previous")
MONETBIL_KEY = "svc_test_key"
MONETBIL_SECRET = "svc_test_secret"
TABLES = ", ".join(table.name for table in Base.metadata.sorted_tables)


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module", autouse=True)
def frozen_heap() -> None:
    """What earlier modules left alive is never scanned again. Late in a
    full run the heap of this process is large and a full collection takes
    hundreds of ms, stopping every thread: timing tests (webhook answers
    within 1 s or 100 ms p99) measured the test process's garbage collector,
    not payfleet. Freezing is cheap; the cost is that cyclic garbage alive
    at a module boundary is kept."""
    gc.freeze()


@pytest.fixture(scope="session")
def run_id() -> str:
    return f"payfleet_test_{os.getpid()}"


@pytest.fixture(scope="session")
def database_url(run_id: str) -> Iterator[str]:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{run_id}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{run_id}"')
    url = f"{PG_HOST_PART}/{run_id}"
    migrate(url)
    yield url
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{run_id}" WITH (FORCE)')


@pytest.fixture(scope="session")
def vhost(run_id: str) -> Iterator[str]:
    _rabbitmqctl("add_vhost", run_id)
    _rabbitmqctl("set_permissions", "-p", run_id, "guest", ".*", ".*", ".*")
    yield run_id
    _rabbitmqctl("delete_vhost", run_id)


@pytest.fixture(scope="session")
def broker_url(vhost: str) -> str:
    return f"{AMQP_HOST_PART}/{urllib.parse.quote(vhost, safe='')}"


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    with FakeStripe() as fake:
        yield fake


@pytest.fixture
def fake_monetbil() -> Iterator[FakeMonetbil]:
    with FakeMonetbil(service_key=MONETBIL_KEY, service_secret=MONETBIL_SECRET) as fake:
        yield fake


def process_env(database_url: str, broker_url: str, stripe_base: str, monetbil_base: str) -> dict[str, str]:
    """What every payfleet process started by the tests is given: its
    database and vhost, the admin token, the providers' test credentials and
    the fake providers' addresses."""
    return {
        "DATABASE_URL": database_url,
        "BROKER_URL": broker_url,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "STRIPE_API_KEY": "sk_test_payfleet",
        "STRIPE_WEBHOOK_SECRETS": ",".join(WEBHOOK_SECRETS),
        "STRIPE_API_BASE": stripe_base,
        "MONETBIL_SERVICE_KEY": MONETBIL_KEY,
        "MONETBIL_SERVICE_SECRET": MONETBIL_SECRET,
        "MONETBIL_API_BASE": monetbil_base,
        "PUBLIC_BASE_URL": "http://shop.test",
    }


@pytest.fixture
def env(
    database_url: str,
    broker_url: str,
    fake_stripe: FakeStripe,
    fake_monetbil: FakeMonetbil,
    fake_whatsapp: FakeWhatsApp,
    tmp_path: Path,
) -> dict[str, str]:
    """The environment a payfleet process gets in tests: short retry delays
    and relay grace, so failure paths finish in seconds, and a worker
    metrics directory of the test's own (Dramatiq's default in /tmp keeps
    every earlier run's counts)."""
    return {
        **process_env(database_url, broker_url, fake_stripe.base_url, fake_monetbil.base_url),
        "EVENT_RETRY_DELAYS_SECONDS": "0.2,0.4",
        "EVENT_TIME_LIMIT_SECONDS": "20",
        "OUTBOX_RELAY_INTERVAL_SECONDS": "0.2",
        "OUTBOX_RELAY_GRACE_SECONDS": "0.5",
        "SCHEDULER_METRICS_PORT": "0",
        "WHATSAPP_API_BASE": fake_whatsapp.base_url,
        "WHATSAPP_ACCOUNT_SID": ACCOUNT_SID,
        "WHATSAPP_AUTH_TOKEN": AUTH_TOKEN,
        "WHATSAPP_FROM": SENDER,
        "NOTIFICATION_RETRY_DELAYS_SECONDS": "0.2,0.4",
        "NOTIFICATION_MAX_ATTEMPTS": "3",
        "dramatiq_prom_db": str(tmp_path / "worker-metrics"),
    }


@pytest.fixture
def fake_whatsapp() -> Iterator[FakeWhatsApp]:
    with FakeWhatsApp() as fake:
        yield fake


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return load_settings(env)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _clean_state(request: pytest.FixtureRequest) -> None:
    """Each test that touches storage starts from empty tables and queues."""
    if "database_url" in request.fixturenames:
        with psycopg.connect(request.getfixturevalue("database_url").replace("+psycopg", "")) as conn:
            conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    if "broker_url" in request.fixturenames:
        broker = build_broker(load_settings({"BROKER_URL": request.getfixturevalue("broker_url")}))
        for queue in ("payments", "jobs", "notifications"):
            broker.declare_queue(queue, ensure=True)
            broker.flush(queue)
        broker.close()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessions(engine)


@pytest.fixture
def parts(settings: Settings) -> Iterator[Collaborators]:
    c = collaborators(settings)
    yield c
    c.engine.dispose()


@pytest.fixture
def client(parts: Collaborators) -> testing.TestClient:
    return testing.TestClient(create_app(parts))


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def worker(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[dramatiq.Worker]:
    """Real Dramatiq worker threads consuming the test vhost."""
    broker = build_broker(settings)
    declare_event_actors(broker, sessions, settings)
    declare_job_actors(broker, sessions, settings, job_gateways(settings))
    running = dramatiq.Worker(broker, worker_threads=4, worker_timeout=100)
    running.start()
    yield running
    running.stop()
    broker.close()


def eventually(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll until `check()` returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"condition not met within {timeout}s (last value {value!r})"
            return value
        time.sleep(interval)


def scalar(sessions: sessionmaker[Session], sql: str, **params: Any) -> Any:
    with sessions() as session:
        return session.execute(text(sql), params).scalar()


# --- the fleet as real processes (for the end-to-end tests) ---------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def spawn(env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "payfleet.cli", *args],
            env={**os.environ, **env, "WEB_CONCURRENCY": "2"},
            start_new_session=True,  # its own process group: what is left of it is killed below
        )
        started.append(process)
        return process

    yield start
    stop_groups(started, 20)


@pytest.fixture
def ingress(spawn: Callable[..., subprocess.Popen[bytes]]) -> str:
    port = free_port()
    spawn("ingress", "--bind", f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return requests.get(f"{base}/readyz", timeout=10).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    eventually(ready, timeout=30, interval=0.2)
    return base
