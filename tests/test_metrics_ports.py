"""Replicas side by side on one host: a second scheduler or worker whose
metrics port is taken keeps doing its work, without metrics, and says so in
one warning naming the port and the setting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import text

from tests.conftest import eventually, free_port, scalar
from tests.support.processes import Start, payfleet_processes, stop
from tests.support.shop import deliver
from tests.support.stripe_signing import stripe_event


@pytest.fixture
def start(env: dict[str, str], tmp_path: Path) -> Iterator[Start]:
    """`payfleet <args>` as a real process group, its output kept in a file."""
    with payfleet_processes(env, tmp_path) as run:
        yield run


def _metrics(port: int) -> str | None:
    """What the exporter on `port` serves, or None while nothing does."""
    try:
        answer = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except requests.ConnectionError:
        return None
    return answer.text if answer.status_code == 200 else None


def _serves_metrics(port: int) -> bool:
    return _metrics(port) is not None


def _warned(log: Path, port: int, setting: str) -> list[str]:
    lines = log.read_text(errors="replace").splitlines()
    return [line for line in lines if "WARNING" in line and f":{port} ({setting})" in line]


def test_two_schedulers_on_one_metrics_port_both_keep_running(start, sessions):
    port = str(free_port())
    first, _ = start("scheduler", SCHEDULER_METRICS_PORT=port)
    eventually(lambda: _serves_metrics(int(port)), timeout=20)

    second, log = start("scheduler", SCHEDULER_METRICS_PORT=port)

    warnings = eventually(lambda: _warned(log, int(port), "SCHEDULER_METRICS_PORT"), timeout=20)
    assert len(warnings) == 1, warnings
    assert "Traceback" not in log.read_text(errors="replace")
    assert first.poll() is None and second.poll() is None
    # The second does a scheduler's work alone once the first is gone: it
    # relays a stored event nobody published.
    stop(first)
    _store_unpublished_event(sessions)
    eventually(lambda: scalar(sessions, "SELECT published_at FROM provider_events"), timeout=20)
    assert second.poll() is None


def _store_unpublished_event(sessions) -> None:
    with sessions.begin() as session:
        session.execute(
            text(
                "INSERT INTO provider_events "
                "(provider, event_key, event_type, payload, status, attempts, received_at) "
                "VALUES ('stripe', 'evt_unpublished', 'customer.created', '{}', 'received', 0, "
                "now() - interval '10 seconds')"
            )
        )


def test_two_workers_on_one_metrics_port_both_keep_running(start, client, sessions):
    port = str(free_port())
    worker = ("worker", "--processes", "1", "--threads", "2")
    first, _ = start(*worker, WORKER_METRICS_PORT=port)
    eventually(lambda: _serves_metrics(int(port)), timeout=30)

    second, log = start(*worker, WORKER_METRICS_PORT=port)

    # Needs workers/main.py to wire workers.metrics.WorkerMetrics in place of
    # Dramatiq's Prometheus middleware, whose exporter dies on a taken port.
    warnings = eventually(lambda: _warned(log, int(port), "WORKER_METRICS_PORT"), timeout=30)
    assert len(warnings) == 1, warnings
    assert "Address already in use" not in log.read_text(errors="replace").replace(warnings[0], "")
    assert first.poll() is None and second.poll() is None
    # The second applies events alone once the first is gone.
    stop(first)
    body = stripe_event("customer.created", {"id": "cus_1", "object": "customer"})
    assert deliver(client, body).status_code == 200
    eventually(lambda: scalar(sessions, "SELECT status FROM provider_events") != "received", timeout=30)
    assert scalar(sessions, "SELECT status FROM provider_events") == "ignored"
    assert second.poll() is None


def test_a_worker_exports_the_messages_its_processes_handled(start, client, sessions):
    # Each worker process writes its counts to prometheus-client's
    # multiprocess files only if it first imported prometheus-client after
    # Dramatiq's middleware pointed it there: imported any earlier (in the
    # supervisor before it forks, say), the counts stay in the process and
    # the exporter serves none. The test's own metrics directory (see env)
    # holds no earlier run's counts.
    port = str(free_port())
    start("worker", "--processes", "2", "--threads", "2", WORKER_METRICS_PORT=port)
    body = stripe_event("customer.created", {"id": "cus_1", "object": "customer"})
    assert deliver(client, body).status_code == 200
    eventually(lambda: scalar(sessions, "SELECT status FROM provider_events") == "ignored", timeout=30)

    counted = 'dramatiq_messages_total{actor_name="apply_event",queue_name="payments"} 1.0'
    assert eventually(lambda: counted in (_metrics(int(port)) or ""), timeout=10)
