"""The fleet as real processes: gunicorn, a Dramatiq worker and the scheduler
started through the `payfleet` command, driven over HTTP on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ADMIN_TOKEN, eventually, free_port
from tests.support.processes import kill_up, payfleet_processes, stop
from tests.support.shop import SECRET, intent_event
from tests.support.stripe_signing import sign_stripe_payload
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _deliver(base: str, body: bytes) -> requests.Response:
    headers = {"Stripe-Signature": sign_stripe_payload(body, SECRET), "Content-Type": "application/json"}
    return requests.post(f"{base}/webhooks/stripe", data=body, headers=headers, timeout=10)


def _checkout(base: str, sku: str, quantity: int) -> Any:
    body = {"items": [{"sku": sku, "quantity": quantity}], "provider": "stripe", "currency": "EUR"}
    answer = requests.post(f"{base}/checkout", json=body, timeout=10)
    assert answer.status_code == 201, answer.text
    return answer.json()


def _put_product(base: str, sku: str, on_hand: int) -> None:
    body = {"name": sku, "price": 2500, "currency": "EUR", "on_hand": on_hand}
    assert (
        requests.put(f"{base}/admin/products/{sku}", json=body, headers=ADMIN, timeout=10).status_code == 201
    )


def _get(base: str, path: str) -> Any:
    return requests.get(f"{base}{path}", headers=ADMIN, timeout=10).json()


def test_product_checkout_signed_webhook_paid_order_and_sold_stock(ingress, spawn):
    spawn("worker", "--processes", "1", "--threads", "2")
    spawn("scheduler")
    _put_product(ingress, "MUG", on_hand=4)
    placed = _checkout(ingress, "MUG", 3)
    intent = placed["payment"]["provider_payment_id"]

    answer = _deliver(ingress, intent_event("payment_intent.succeeded", intent))
    assert answer.json() == {"received": True, "duplicate": False}

    paid = eventually(
        lambda: (o := _get(ingress, f"/admin/orders/{placed['order_id']}"))["status"] == "paid" and o
    )
    assert paid["payment"]["status"] == "succeeded"
    product = _get(ingress, "/admin/products/MUG")
    assert (product["on_hand"], product["reserved"], product["available"]) == (1, 0, 1)
    metrics = requests.get(f"{ingress}/metrics", timeout=10).text
    assert 'payfleet_webhooks_total{outcome="stored",provider="stripe"} 1.0' in metrics
    assert 'payfleet_http_responses_total{method="POST",route="/webhooks/stripe",status="200"} 1.0' in metrics
    assert 'route="/admin/orders/{order_id}"' in metrics  # templates, never one series per id


def test_events_taken_while_the_worker_is_dead_are_applied_once_after_restart(ingress, spawn):
    worker = spawn("worker", "--processes", "1", "--threads", "2")
    _put_product(ingress, "CAP", on_hand=10)
    orders = [_checkout(ingress, "CAP", 1) for _ in range(3)]
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()

    for placed in orders:
        body = intent_event("payment_intent.succeeded", placed["payment"]["provider_payment_id"])
        assert _deliver(ingress, body).status_code == 200
        assert _deliver(ingress, body).json()["duplicate"] is True

    spawn("worker", "--processes", "1", "--threads", "2")
    eventually(
        lambda: {_get(ingress, f"/admin/orders/{p['order_id']}")["status"] for p in orders} == {"paid"}
    )
    product = _get(ingress, "/admin/products/CAP")
    assert (product["on_hand"], product["reserved"]) == (7, 0)


def test_a_worker_process_holds_one_rabbitmq_connection_per_consumer(env, spawn, broker_url):
    """A worker process has six consumers (three queues and their delay
    queues), a connection each. The queues are declared once at its start,
    on a connection closed before the consumers start (workers.main's
    WarmStart). Left to Dramatiq, each consumer declared them on a second
    connection of its own, kept open: twelve per process (this test then
    counts 24)."""
    with TcpProxy("127.0.0.1", 5672) as proxy:
        env["BROKER_URL"] = proxy.url_for(broker_url)
        worker = spawn("worker", "--processes", "2", "--threads", "2")
        try:
            eventually(lambda: proxy.connections >= 12, timeout=30)
            time.sleep(2)  # any later connection would be open by now
            assert proxy.connections == 12
        finally:
            stop(worker)  # before the proxy goes, which would be an outage


@pytest.mark.parametrize(
    "interrupt",
    [
        pytest.param(lambda up: os.killpg(up.pid, signal.SIGINT), id="ctrl-c-in-a-terminal"),
        pytest.param(lambda up: up.send_signal(signal.SIGINT), id="sigint-to-up-alone"),
        pytest.param(lambda up: up.send_signal(signal.SIGTERM), id="sigterm-to-up-alone"),
    ],
)
def test_up_runs_the_fleet_and_stops_cleanly(env, tmp_path, interrupt):
    # A terminal's Ctrl-C reaches every process of its foreground group, not
    # just `up`. Each of up's children must still see one stop signal: a
    # second one makes Dramatiq's supervisor forward it again, and a worker
    # process told twice exits at once ("Killing worker process…") instead
    # of finishing the messages it holds.
    port = free_port()
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "payfleet.cli", "up", "--bind", f"127.0.0.1:{port}", "--processes", "2"],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        eventually(lambda: _healthy(f"http://127.0.0.1:{port}"), timeout=30, interval=0.2)
        _wait_for_worker_processes(log, 2)
        interrupt(up)
        assert up.wait(40) == 0, log.read_text()[-3000:]
    finally:
        if up.poll() is None:
            kill_up(up)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    _assert_each_stopped_once(log, 2)


def test_a_worker_told_to_stop_stops_its_processes_once_and_exits_0(env, tmp_path):
    # SIGTERM to `payfleet worker` alone, as compose (tini) or an init sends
    # it: Dramatiq's supervisor forwards it once to each worker process,
    # which finishes what it holds and exits.
    with payfleet_processes(env, tmp_path) as start:
        worker, log = start("worker", "--processes", "2", "--threads", "2")
        _wait_for_worker_processes(log, 2)
        stop(worker)
    assert worker.returncode == 0, log.read_text()[-3000:]
    _assert_each_stopped_once(log, 2)


def _wait_for_worker_processes(log: Path, processes: int) -> None:
    eventually(lambda: log.read_text().count("Worker process is ready for action") == processes, timeout=30)


def _assert_each_stopped_once(log: Path, processes: int) -> None:
    """Each Dramatiq worker process was told to stop once: told twice, it
    says "Killing worker process" and drops the messages it holds."""
    text = log.read_text()
    assert text.count("Stopping worker process") == processes
    assert "Killing worker process" not in text


def _healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthz", timeout=10).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False


def test_a_worker_process_collects_garbage_again_once_its_modules_are_in(env):
    """workers.main turns the garbage collector off for its imports (they
    take an eighth less time without it); a worker process must not run
    without one."""
    code = "import gc, workers.main; print(gc.isenabled(), gc.get_freeze_count() > 10_000)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", "True"], done.stderr[-2000:]
