"""`payfleet up` with no provider keys, as `make up` runs it on a fresh
machine: the sandbox starts beside the fleet, a checkout goes to it, and
`payfleet sandbox pay` settles the order through real signed webhooks into
the ingress; `payfleet demo` passes against that fleet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ADMIN_TOKEN, eventually, free_port
from tests.support.processes import kill_up

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PROVIDER_SETTINGS = (
    "STRIPE_API_KEY",
    "STRIPE_WEBHOOK_SECRETS",
    "STRIPE_API_BASE",
    "MONETBIL_SERVICE_KEY",
    "MONETBIL_SERVICE_SECRET",
    "MONETBIL_API_BASE",
    "PUBLIC_BASE_URL",
)


@dataclass(frozen=True)
class Fleet:
    url: str
    sandbox: str
    env: dict[str, str]
    log: Path


@pytest.fixture(scope="module")
def fleet(database_url: str, broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    ingress, sandbox = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in PROVIDER_SETTINGS},
        "DATABASE_URL": database_url,
        "BROKER_URL": broker_url,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "SANDBOX_BIND": f"127.0.0.1:{sandbox}",
        "WORKER_METRICS_PORT": str(free_port()),
        "SCHEDULER_METRICS_PORT": str(free_port()),
        "WEB_CONCURRENCY": "2",
        "ORDER_PAYMENT_WINDOW_SECONDS": "8",
        "EVENT_RETRY_DELAYS_SECONDS": "0.2,0.4",
        "OUTBOX_RELAY_INTERVAL_SECONDS": "0.2",
        "OUTBOX_RELAY_GRACE_SECONDS": "0.5",
    }
    log = tmp_path_factory.mktemp("sandbox-fleet") / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "payfleet.cli",
                "up",
                "--bind",
                f"127.0.0.1:{ingress}",
                "--processes",
                "1",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{ingress}"
    try:
        eventually(
            lambda: _answers(f"{url}/readyz") and _answers(f"http://127.0.0.1:{sandbox}/sandbox"), 60, 0.2
        )
        yield Fleet(url, f"http://127.0.0.1:{sandbox}", env, log)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(40)
            except subprocess.TimeoutExpired:
                kill_up(up)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False


def _order(fleet: Fleet, order_id: str) -> Any:
    return requests.get(f"{fleet.url}/admin/orders/{order_id}", headers=ADMIN, timeout=10).json()


def _payfleet(fleet: Fleet, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "payfleet.cli", *args],
        env=fleet.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _put_product(fleet: Fleet, sku: str, currency: str) -> None:
    body = {"name": sku, "price": 2500, "currency": currency, "on_hand": 5}
    answer = requests.put(f"{fleet.url}/admin/products/{sku}", json=body, headers=ADMIN, timeout=10)
    assert answer.status_code == 201, answer.text


def _checkout(fleet: Fleet, sku: str, provider: str, currency: str) -> Any:
    body = {"items": [{"sku": sku, "quantity": 2}], "provider": provider, "currency": currency}
    answer = requests.post(f"{fleet.url}/checkout", json=body, timeout=10)
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_up_without_keys_says_so_and_starts_the_sandbox(fleet):
    lines = fleet.log.read_text().splitlines()
    assert any(
        line.startswith("sandbox providers: no real money moves; set STRIPE_API_KEY") for line in lines
    )
    assert requests.get(f"{fleet.sandbox}/sandbox", timeout=5).json()["webhook_url"] == fleet.url


@pytest.mark.parametrize(("provider", "currency"), [("stripe", "EUR"), ("monetbil", "XAF")])
def test_checkout_then_sandbox_pay_makes_the_order_paid_with_a_sale(fleet, provider, currency):
    sku = f"SBX-{provider.upper()}"
    _put_product(fleet, sku, currency)
    placed = _checkout(fleet, sku, provider, currency)

    paid = _payfleet(fleet, "sandbox", "pay", placed["order_id"])
    assert paid.returncode == 0, paid.stdout + paid.stderr
    assert "HTTP 200" in paid.stdout

    order = eventually(lambda: (o := _order(fleet, placed["order_id"]))["status"] == "paid" and o)
    assert order["payment"]["status"] == "succeeded"
    [event] = [e for e in order["timeline"] if e["kind"] == "event"]
    assert (event["provider"], event["status"]) == (provider, "processed")  # verified, stored, applied
    sales = [e for e in order["timeline"] if e["kind"] == "movement" and e["type"] == "sale"]
    assert [(s["sku"], s["quantity"], s["before"], s["after"]) for s in sales] == [(sku, -2, 5, 3)]
    stock = requests.get(f"{fleet.url}/admin/products/{sku}", headers=ADMIN, timeout=10).json()
    assert (stock["on_hand"], stock["reserved"]) == (3, 0)


def test_the_demo_passes_end_to_end(fleet):
    demo = _payfleet(fleet, "demo", "--url", fleet.url, timeout=240)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "demo passed" in demo.stdout
    assert "explained" not in demo.stdout  # the 8 s window lets it show an expiry
