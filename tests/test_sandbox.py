"""The sandbox process's parts, over real HTTP: its Stripe API against the
real `stripe` library, its Monetbil API against payfleet's own gateway, and
its webhooks, verified by the ingress's own signature code and retried on
a non-2xx. (tests/test_sandbox_fleet.py runs it beside the whole fleet.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import pytest
import requests
import stripe

from domain.errors import ProviderError
from domain.gateways import MonetbilApiGateway, StripeApiGateway
from ingress import monetbil_signature, stripe_signature
from ingress.errors import ApiError
from payfleet.sandbox.loopback import LoopbackServer, Reply
from payfleet.sandbox.server import Sandbox, SandboxConfig
from tests.conftest import eventually, free_port

STRIPE_SECRET = "whsec_sandbox_test"
MONETBIL_KEY = "sandbox_key"
MONETBIL_SECRET = "sandbox_monetbil_secret"


class Shop(LoopbackServer):
    """A stand-in for the ingress's webhook routes: it verifies each delivery
    with the ingress's own code and answers the next queued status (200 once
    the queue is empty)."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[str, Any]] = []
        self.statuses: list[int] = []

    def respond(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        with self._lock:
            if path == "/webhooks/stripe":
                stripe_signature.verify(body, headers.get("Stripe-Signature"), (STRIPE_SECRET,), 300)
                self.received.append((path, json.loads(body)))
            else:
                form = dict(parse_qsl(body.decode()))
                try:
                    monetbil_signature.verify(form, MONETBIL_SECRET)
                except ApiError:
                    return Reply(403, b"bad signature")
                self.received.append((path, form))
            status = self.statuses.pop(0) if self.statuses else 200
        return Reply(status, b"received")


@pytest.fixture
def shop() -> Iterator[Shop]:
    with Shop() as server:
        yield server


@pytest.fixture
def sandbox(shop: Shop) -> Iterator[Sandbox]:
    config = SandboxConfig(
        shop.base_url, STRIPE_SECRET, MONETBIL_KEY, MONETBIL_SECRET, retry_delays=(0.2, 0.4)
    )
    with Sandbox(config) as running:
        yield running
    assert running.stripe.internal_errors == [] and running.monetbil.internal_errors == []


def _client(sandbox: Sandbox) -> stripe.StripeClient:
    return stripe.StripeClient("sk_test_x", base_addresses={"api": sandbox.base_url}, max_network_retries=0)


def _intent(sandbox: Sandbox, order_id: str, amount: int = 1500) -> Any:
    return _client(sandbox).v1.payment_intents.create(
        params={"amount": amount, "currency": "eur", "metadata": {"order_id": order_id}},
        options={"idempotency_key": f"checkout-{order_id}"},
    )


def _monetbil(sandbox: Sandbox) -> MonetbilApiGateway:
    return MonetbilApiGateway(MONETBIL_KEY, sandbox.base_url, timeout=5)


def _start_monetbil(sandbox: Sandbox, shop: Shop, order_id: str, amount: int = 5000) -> str:
    return _monetbil(sandbox).start_payment(
        amount=amount,
        currency="XAF",
        payment_ref=order_id,
        item_ref="WAX",
        notify_url=f"{shop.base_url}/webhooks/monetbil",
        return_url="http://shop.test/",
        phone="+237670000001",
        email=None,
    )


def _act(sandbox: Sandbox, order_id: str, action: str, **body: Any) -> requests.Response:
    return requests.post(f"{sandbox.base_url}/sandbox/orders/{order_id}/{action}", json=body, timeout=30)


# --- its Stripe API, through the real library ---------------------------------


def test_stripe_create_retrieve_cancel_and_idempotency(sandbox):
    client = _client(sandbox)
    created = _intent(sandbox, "o-1")
    again = _intent(sandbox, "o-1")  # the same key and parameters: the stored answer
    assert again.id == created.id and again.last_response.headers["Idempotent-Replayed"] == "true"
    assert client.v1.payment_intents.retrieve(created.id).status == "requires_payment_method"
    canceled = client.v1.payment_intents.cancel(created.id, params={"cancellation_reason": "abandoned"})
    assert (canceled.status, canceled.cancellation_reason) == ("canceled", "abandoned")
    with pytest.raises(stripe.IdempotencyError):
        _intent(sandbox, "o-1", amount=99)  # the same key with other parameters


def test_stripe_list_pages_through_every_intent(sandbox):
    ids = {_intent(sandbox, f"o-{n}").id for n in range(7)}
    pages = _client(sandbox).v1.payment_intents.list(params={"limit": 3, "created": {"gte": 0}})
    assert len(pages.data) == 3 and pages.has_more
    assert {intent.id for intent in pages.auto_paging_iter()} == ids


def test_stripe_errors_come_in_stripes_shapes(sandbox):
    client = _client(sandbox)
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.payment_intents.retrieve("pi_nope")
    assert missing.value.code == "resource_missing" and missing.value.http_status == 404
    paid = _intent(sandbox, "o-2")
    assert _act(sandbox, "o-2", "pay").status_code == 200
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.payment_intents.cancel(paid.id)
    assert refused.value.code == "payment_intent_unexpected_state"
    sandbox.stripe.rate_limit(0)
    with pytest.raises(stripe.RateLimitError) as limited:
        client.v1.payment_intents.retrieve(paid.id)
    assert limited.value.http_status == 429
    body = limited.value.json_body
    assert isinstance(body, dict) and body["error"]["code"] == "rate_limit"
    sandbox.stripe.rate_limit(None)
    with pytest.raises(stripe.InvalidRequestError):
        _client(sandbox).v1.payment_intents.create(params={"currency": "eur"})  # type: ignore[typeddict-item]


def test_a_live_key_is_refused_by_its_stripe_api(sandbox):
    live = stripe.StripeClient("sk_live_x", base_addresses={"api": sandbox.base_url}, max_network_retries=0)
    with pytest.raises(stripe.AuthenticationError):
        live.v1.payment_intents.list()


def test_payfleets_stripe_gateway_works_against_it(sandbox):
    gateway = StripeApiGateway("sk_test_x", sandbox.base_url, max_retries=0)
    intent = gateway.create_payment_intent(
        amount=2500, currency="EUR", metadata={"order_id": "o-3"}, idempotency_key="k-3"
    )
    assert intent.client_secret and intent.metadata == {"order_id": "o-3"}
    assert gateway.retrieve_payment_intent(intent.id).status == "requires_payment_method"


# --- its Monetbil API, through payfleet's gateway ------------------------------


def test_monetbil_widget_and_check_payment(sandbox, shop):
    url = _start_monetbil(sandbox, shop, "o-4")
    assert url.startswith(f"{sandbox.base_url}/pay/")
    assert requests.get(url, timeout=5).status_code == 200
    answer = _act(sandbox, "o-4", "pay").json()
    transaction = answer["deliveries"][0]["label"].split()[-1]
    check = _monetbil(sandbox).check_transaction(transaction)
    assert (check.status, check.amount, check.currency) == ("succeeded", 5000, "XAF")
    assert check.covers(5000, "XAF")
    with pytest.raises(ProviderError, match="Invalid service key"):
        MonetbilApiGateway("other", sandbox.base_url).start_payment(
            amount=1, currency="XAF", payment_ref="x", item_ref="", notify_url="", return_url="",
            phone=None, email=None,
        )  # fmt: skip


# --- its webhooks --------------------------------------------------------------


def test_pay_sends_a_signed_stripe_event_for_the_orders_intent(sandbox, shop):
    intent = _intent(sandbox, "o-5")
    answer = _act(sandbox, "o-5", "pay")
    assert answer.status_code == 200, answer.text
    assert answer.json()["deliveries"][0]["delivered"] is True
    [(path, event)] = shop.received
    assert (path, event["type"]) == ("/webhooks/stripe", "payment_intent.succeeded")
    assert event["data"]["object"]["id"] == intent.id
    assert _client(sandbox).v1.payment_intents.retrieve(intent.id).status == "succeeded"  # it agrees


@pytest.mark.parametrize(
    ("action", "event_type", "status"),
    [
        ("fail", "payment_intent.payment_failed", "requires_payment_method"),
        ("cancel", "payment_intent.canceled", "canceled"),
    ],
)
def test_fail_and_cancel_send_their_stripe_events(sandbox, shop, action, event_type, status):
    intent = _intent(sandbox, "o-6")
    assert _act(sandbox, "o-6", action).status_code == 200
    assert [event["type"] for _, event in shop.received] == [event_type]
    assert _client(sandbox).v1.payment_intents.retrieve(intent.id).status == status


def test_refund_sends_a_full_charge_refunded_for_a_paid_intent_only(sandbox, shop):
    intent = _intent(sandbox, "o-7")
    refused = _act(sandbox, "o-7", "refund")
    assert refused.status_code == 409 and refused.json()["error"] == "invalid_state"
    assert shop.received == []  # refused: nothing sent, nothing changed
    _act(sandbox, "o-7", "pay")
    assert _act(sandbox, "o-7", "refund").status_code == 200
    charge = shop.received[-1][1]["data"]["object"]
    assert (charge["object"], charge["payment_intent"], charge["refunded"]) == ("charge", intent.id, True)


def test_monetbil_callbacks_are_signed_and_agree_with_check_payment(sandbox, shop):
    _start_monetbil(sandbox, shop, "o-8")
    assert _act(sandbox, "o-8", "fail").status_code == 200
    assert _act(sandbox, "o-8", "pay").status_code == 200  # a new try: a new transaction
    (_, failed), (_, paid) = shop.received
    assert (failed["status"], paid["status"]) == ("failed", "success")
    assert failed["transaction_id"] != paid["transaction_id"]
    assert _monetbil(sandbox).check_transaction(failed["transaction_id"]).status == "failed"
    assert _monetbil(sandbox).check_transaction(paid["transaction_id"]).status == "succeeded"
    assert paid["payment_ref"] == "o-8" and paid["amount"] == "5000"
    refund = _act(sandbox, "o-8", "refund")
    assert refund.status_code == 409 and "Monetbil" in refund.json()["detail"]


def test_trigger_with_duplicates_resends_the_same_event(sandbox, shop):
    _intent(sandbox, "o-9")
    answer = _act(sandbox, "o-9", "trigger", event="payment_intent.processing", duplicate=2, delay=0.1)
    assert answer.status_code == 200
    ids = [event["id"] for _, event in shop.received]
    assert len(ids) == 3 and len(set(ids)) == 1
    _start_monetbil(sandbox, shop, "o-10")
    _act(sandbox, "o-10", "trigger", event="success", duplicate=1)
    first, second = (form for path, form in shop.received if path == "/webhooks/monetbil")
    assert first == second  # the same transaction and status: a duplicate to the shop


def test_a_refused_delivery_is_retried_until_accepted(sandbox, shop):
    _intent(sandbox, "o-11")
    shop.statuses = [503, 500]
    answer = _act(sandbox, "o-11", "pay").json()
    assert answer["deliveries"][0]["delivered"] is False
    eventually(lambda: len(shop.received) == 3, timeout=10)
    events = [event for _, event in shop.received]
    assert len({event["id"] for event in events}) == 1  # the same event, signed afresh each time

    def statuses() -> list[int]:
        attempts = requests.get(f"{sandbox.base_url}/sandbox/deliveries", timeout=5).json()
        return [a["status"] for a in attempts]

    # The sender records an attempt once the shop's answer is back, so the
    # shop can hold the third delivery a moment before the sandbox lists it.
    eventually(lambda: len(statuses()) == 3, timeout=10)
    assert statuses() == [503, 500, 200]


@pytest.mark.parametrize(
    ("order", "action", "body", "status", "error"),
    [
        ("nope", "pay", {}, 404, "unknown_order"),
        ("o-12", "dance", {}, 404, "unknown_action"),
        ("o-12", "pay", {"duplicate": -1}, 400, "bad_request"),
        ("o-12", "pay", {"duplicate": "2"}, 400, "bad_request"),
        ("o-12", "pay", {"delay": 3600}, 400, "bad_request"),
        ("o-12", "pay", {"colour": "red"}, 400, "bad_request"),
        ("o-12", "trigger", {}, 400, "bad_request"),
        ("o-12", "trigger", {"event": "customer.created"}, 400, "unknown_event"),
    ],
)
def test_bad_actions_get_a_clear_error_and_change_nothing(sandbox, shop, order, action, body, status, error):
    intent = _intent(sandbox, "o-12")
    answer = _act(sandbox, order, action, **body)
    assert (answer.status_code, answer.json()["error"]) == (status, error)
    assert shop.received == []
    assert sandbox.stripe.get(intent.id)["status"] == "requires_payment_method"


# --- the command ---------------------------------------------------------------


def test_a_live_stripe_key_refuses_the_sandbox():
    port = free_port()
    env = {**os.environ, "STRIPE_API_KEY": "sk_live_abc", "SANDBOX_BIND": f"127.0.0.1:{port}"}
    run = subprocess.run(
        [sys.executable, "-m", "payfleet.cli", "sandbox"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2
    assert "live key" in run.stderr and "sk_live_abc" not in run.stderr + run.stdout
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/sandbox", timeout=2)


def test_the_command_serves_and_acts(shop):
    port = free_port()
    env = {
        **os.environ,
        "SANDBOX_BIND": f"127.0.0.1:{port}",
        "STRIPE_WEBHOOK_SECRETS": STRIPE_SECRET,
        "MONETBIL_SERVICE_KEY": MONETBIL_KEY,
        "MONETBIL_SERVICE_SECRET": MONETBIL_SECRET,
    }
    command = [sys.executable, "-m", "payfleet.cli", "sandbox"]
    serving = subprocess.Popen(
        [*command, "--webhook-url", shop.base_url], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert serving.stdout is not None
        assert "no real money moves" in serving.stdout.readline()
        base = f"http://127.0.0.1:{port}"
        client = stripe.StripeClient("sk_test_x", base_addresses={"api": base}, max_network_retries=0)
        client.v1.payment_intents.create(
            params={"amount": 700, "currency": "eur", "metadata": {"order_id": "c-1"}}
        )
        paid = subprocess.run([*command, "pay", "c-1"], env=env, capture_output=True, text=True, timeout=60)
        assert paid.returncode == 0, paid.stderr
        assert "payment_intent.succeeded" in paid.stdout and "HTTP 200" in paid.stdout
        unknown = subprocess.run(
            [*command, "pay", "c-2"], env=env, capture_output=True, text=True, timeout=60
        )
        assert unknown.returncode == 2 and "no payment for order c-2" in unknown.stderr
        assert [event["type"] for _, event in shop.received] == ["payment_intent.succeeded"]
    finally:
        serving.terminate()
        assert serving.wait(10) == 0


def test_actions_are_serialized(sandbox, shop):
    """Two customers acting at once: each webhook leaves whole, none is lost."""
    for n in range(4):
        _intent(sandbox, f"p-{n}")
    threads = [threading.Thread(target=_act, args=(sandbox, f"p-{n}", "pay")) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(event["data"]["object"]["metadata"]["order_id"] for _, event in shop.received) == [
        f"p-{n}" for n in range(4)
    ]


def test_a_late_trigger_leaves_the_providers_record_as_it_was(sandbox, shop):
    intent = _intent(sandbox, "o-13")
    _act(sandbox, "o-13", "pay")
    assert _act(sandbox, "o-13", "trigger", event="payment_intent.payment_failed").status_code == 200
    late = shop.received[-1][1]
    assert (late["type"], late["data"]["object"]["status"]) == (
        "payment_intent.payment_failed",
        "requires_payment_method",
    )
    assert _client(sandbox).v1.payment_intents.retrieve(intent.id).status == "succeeded"

    _start_monetbil(sandbox, shop, "o-14")
    paid = _act(sandbox, "o-14", "pay").json()
    transaction = paid["transaction"]["transaction_id"]
    _act(sandbox, "o-14", "trigger", event="failed")
    assert shop.received[-1][1]["transaction_id"] == transaction
    assert _monetbil(sandbox).check_transaction(transaction).status == "succeeded"


def test_the_monetbil_payment_page_lets_a_developer_pay_as_the_customer(sandbox, shop):
    page = requests.get(_start_monetbil(sandbox, shop, "o-15"), timeout=5)
    assert page.status_code == 200
    action = f"{sandbox.base_url}/sandbox/orders/o-15/pay"
    assert f'action="{action}"' in page.text
    clicked = requests.post(action, data={}, timeout=10)  # what the page's form sends
    assert clicked.status_code == 200, clicked.text
    assert [form["status"] for _, form in shop.received] == ["success"]
