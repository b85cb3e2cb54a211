"""Routing at checkout when providers fail: fallback to the next provider on
the one reservation, nothing left behind when all fail, the circuit shared
by two app instances through PostgreSQL, and many checkouts at once."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from falcon import testing
from prometheus_client import REGISTRY
from sqlalchemy import text

from ingress.app import collaborators, create_app
from payfleet.platform.config import load_settings
from tests.conftest import eventually, scalar
from tests.support.shop import (
    ADMIN,
    auto_checkout,
    order,
    post_callback,
    product,
    put_product,
    put_routing,
    race,
)

STRIPE_FIRST = [{"name": "cm", "match": {"currency": ["XAF"]}, "providers": ["stripe", "monetbil"]}]


@pytest.fixture
def app_for(env) -> Iterator[Callable[..., testing.TestClient]]:
    """Builds app instances on the test's database, each with its own engine
    (as separate ingress processes would have), providers answering fast."""
    built = []

    def build(**overrides: str) -> testing.TestClient:
        settings = load_settings(
            {**env, "STRIPE_TIMEOUT_SECONDS": "0.3", "MONETBIL_TIMEOUT_SECONDS": "0.3", **overrides}
        )
        parts = collaborators(settings)
        built.append(parts)
        return testing.TestClient(create_app(parts))

    yield build
    for parts in built:
        parts.engine.dispose()


@pytest.fixture
def shop(app_for, fake_stripe, fake_monetbil) -> testing.TestClient:
    client: testing.TestClient = app_for(ROUTING_CIRCUIT_FAILURES="1000")
    put_product(client, "PAGNE", on_hand=5, price=2500, currency="XAF")
    assert put_routing(client, STRIPE_FIRST).status_code == 200
    return client


def _rows(sessions: Any, sql: str, **params: Any) -> list[Any]:
    with sessions() as session:
        return list(session.execute(text(sql), params))


def _reasons(client, order_id: str) -> list[str]:
    return [entry.get("reason", "") for entry in order(client, order_id)["timeline"]]


def _reserved_once(client, sessions, order_id: str, quantity: int) -> None:
    assert (product(client, "PAGNE")["reserved"], product(client, "PAGNE")["on_hand"]) == (quantity, 5)
    reservations = _rows(sessions, "SELECT order_id, quantity, status FROM stock_reservations")
    assert [(str(r.order_id), r.quantity, r.status) for r in reservations] == [(order_id, quantity, "active")]


def test_stripe_answering_500_falls_back_to_monetbil_on_the_same_reservation(
    shop, fake_stripe, fake_monetbil, sessions, worker
):
    fake_stripe.fail_all(500)

    answer = auto_checkout(shop, ("PAGNE", 2), currency="XAF", country="CM")

    assert answer.status_code == 201, answer.text
    order_id = answer.json["order_id"]
    assert answer.json["payment"]["provider"] == "monetbil"
    assert answer.json["payment"]["payment_url"].startswith(fake_monetbil.base_url)
    tried = answer.json["routing"]["tried"]
    assert answer.json["routing"]["rule"] == "cm"
    assert [(t["provider"], t["outcome"]) for t in tried] == [
        ("stripe", "server_error"),
        ("monetbil", "started"),
    ]
    assert "Stripe answered HTTP 500" in tried[0]["detail"]
    _reserved_once(shop, sessions, order_id, 2)
    payments = _rows(sessions, "SELECT order_id, provider, status, provider_payment_id FROM payments")
    assert [(str(p.order_id), p.provider, p.status, p.provider_payment_id) for p in payments] == [
        (order_id, "monetbil", "pending", None)
    ]
    assert fake_stripe.payment_intents == {}  # a 500 created nothing there
    assert list(fake_monetbil.payment_requests) == [order_id]
    reasons = _reasons(shop, order_id)
    assert any(r.startswith("routing: stripe failed (Stripe answered HTTP 500") for r in reasons), reasons
    assert any(r.startswith("routing: rule 'cm'; stripe server_error") for r in reasons), reasons
    assert any(r.endswith("monetbil started") for r in reasons), reasons

    # The switched payment is paid the Monetbil way, like any other.
    assert post_callback(shop, fake_monetbil.pay(order_id)).status_code == 200
    eventually(lambda: order(shop, order_id)["status"] == "paid")
    assert (product(shop, "PAGNE")["on_hand"], product(shop, "PAGNE")["reserved"]) == (3, 0)


def test_a_stripe_timeout_falls_back_and_the_intent_it_created_is_cancelled(
    shop, fake_stripe, fake_monetbil, sessions
):
    fake_stripe.delay(1.0)  # Stripe creates the intent, then answers too late
    try:
        answer = auto_checkout(shop, ("PAGNE", 1), currency="XAF")
    finally:
        fake_stripe.delay(0)

    assert answer.status_code == 201, answer.text
    order_id = answer.json["order_id"]
    tried = answer.json["routing"]["tried"]
    assert [(t["provider"], t["outcome"]) for t in tried] == [("stripe", "timeout"), ("monetbil", "started")]
    assert "Stripe timed out" in tried[0]["detail"]
    _reserved_once(shop, sessions, order_id, 1)
    assert _rows(sessions, "SELECT provider FROM payments")[0].provider == "monetbil"
    # The intent the unanswered call created (one, whatever the retries) is
    # cancelled once Stripe answers again; its secret never reached anyone.
    intents = eventually(
        lambda: [i for i in fake_stripe.payment_intents.values() if i["status"] == "canceled"]
    )
    assert len(fake_stripe.payment_intents) == 1
    assert intents[0]["metadata"]["order_id"] == order_id
    assert intents[0]["cancellation_reason"] == "abandoned"
    assert any(r.startswith("routing: stripe failed (Stripe timed out") for r in _reasons(shop, order_id))


def test_when_every_provider_fails_the_answer_is_502_and_nothing_stays_reserved(
    shop, fake_stripe, fake_monetbil, sessions, env
):
    fake_stripe.fail_all(500)
    fake_monetbil.fail_all(503)

    answer = auto_checkout(shop, ("PAGNE", 2), currency="XAF", country="CM")

    assert (answer.status_code, answer.json["error"]) == (502, "provider_error"), answer.text
    tried = answer.json["routing"]["tried"]
    assert [(t["provider"], t["outcome"]) for t in tried] == [
        ("stripe", "server_error"),
        ("monetbil", "server_error"),
    ]
    assert (
        "Stripe answered HTTP 500" in answer.json["detail"]
        and "Monetbil answered HTTP 503" in answer.json["detail"]
    )
    for secret in (env["STRIPE_API_KEY"], env["MONETBIL_SERVICE_KEY"], "127.0.0.1"):
        assert secret not in answer.text
    assert (product(shop, "PAGNE")["reserved"], product(shop, "PAGNE")["on_hand"]) == (0, 5)
    orders = _rows(
        sessions, "SELECT o.status, p.status AS paid FROM orders o JOIN payments p ON p.order_id = o.id"
    )
    assert [(o.status, o.paid) for o in orders] == [("failed", "failed")]
    assert scalar(sessions, "SELECT count(*) FROM stock_reservations WHERE status = 'active'") == 0


def test_when_every_provider_is_skipped_nothing_is_created(app_for, fake_stripe, fake_monetbil, sessions):
    client = app_for(ROUTING_CIRCUIT_FAILURES="1", ROUTING_CIRCUIT_COOLDOWN_SECONDS="60")
    put_product(client, "PAGNE", on_hand=5, price=2500, currency="XAF")
    assert put_routing(client, STRIPE_FIRST).status_code == 200
    fake_stripe.fail_all(500)
    fake_monetbil.fail_all(500)
    assert auto_checkout(client, ("PAGNE", 1), currency="XAF").status_code == 502  # opens both circuits
    fake_stripe.clear_requests()
    fake_monetbil.clear_requests()

    answer = auto_checkout(client, ("PAGNE", 1), currency="XAF")

    assert (answer.status_code, answer.json["error"]) == (502, "provider_error"), answer.text
    assert answer.json["detail"].startswith("no provider can take this payment (stripe circuit open until")
    assert [s["provider"] for s in answer.json["routing"]["skipped"]] == ["stripe", "monetbil"]
    assert fake_stripe.requests == [] and fake_monetbil.requests == []
    assert scalar(sessions, "SELECT count(*) FROM orders") == 1  # the first one, failed
    assert scalar(sessions, "SELECT count(*) FROM orders WHERE status = 'pending_payment'") == 0
    assert product(client, "PAGNE")["reserved"] == 0


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_circuit_is_shared_by_app_instances_and_closes_after_the_cooldown(
    app_for, fake_stripe, fake_monetbil, sessions
):
    circuit = {"ROUTING_CIRCUIT_FAILURES": "2", "ROUTING_CIRCUIT_COOLDOWN_SECONDS": "1.5"}
    first, second = app_for(**circuit), app_for(**circuit)
    put_product(first, "PAGNE", on_hand=50, price=2500, currency="XAF")
    assert put_routing(first, STRIPE_FIRST).status_code == 200
    fake_stripe.fail_all(500)
    for _ in range(2):
        answer = auto_checkout(first, ("PAGNE", 1), currency="XAF")
        assert [t["provider"] for t in answer.json["routing"]["tried"]] == ["stripe", "monetbil"], answer.text
    skipped_before = _metric(
        "payfleet_routing_decisions_total", rule="cm", provider="stripe", outcome="skipped"
    )
    fake_stripe.clear_requests()

    # The other instance skips Stripe without asking it.
    answer = auto_checkout(second, ("PAGNE", 1), currency="XAF")
    explained = second.simulate_post("/admin/routing/explain", json={"currency": "XAF"}, headers=ADMIN).json

    assert answer.status_code == 201, answer.text
    assert answer.json["routing"]["tried"] == [{"provider": "monetbil", "outcome": "started"}]
    (skipped,) = answer.json["routing"]["skipped"]
    assert skipped["provider"] == "stripe" and skipped["reason"].startswith("circuit open until ")
    assert fake_stripe.requests == []
    assert explained["providers"] == ["monetbil"]
    assert explained["steps"][1].startswith("stripe skipped: circuit open until ")
    assert _metric("payfleet_provider_circuit_open", provider="stripe") == 1
    assert (
        _metric("payfleet_routing_decisions_total", rule="cm", provider="stripe", outcome="skipped")
        == skipped_before + 1
    )

    # After the cool-down Stripe is tried again; one failure of that trial
    # opens the circuit again at once, fleet-wide.
    time.sleep(1.6)
    answer = auto_checkout(first, ("PAGNE", 1), currency="XAF")
    assert [t["provider"] for t in answer.json["routing"]["tried"]] == ["stripe", "monetbil"], answer.text
    answer = auto_checkout(second, ("PAGNE", 1), currency="XAF")
    assert [s["provider"] for s in answer.json["routing"]["skipped"]] == ["stripe"], answer.text

    # Once it answers again, the first success closes it for everyone.
    fake_stripe.heal()
    time.sleep(1.6)
    answer = auto_checkout(second, ("PAGNE", 1), currency="XAF")
    assert answer.json["routing"]["tried"] == [{"provider": "stripe", "outcome": "started"}], answer.text
    assert _rows(sessions, "SELECT open_until, failures FROM provider_circuits WHERE provider = 'stripe'")[
        0
    ] == (
        None,
        [],
    )
    answer = auto_checkout(first, ("PAGNE", 1), currency="XAF")
    assert answer.json["payment"]["provider"] == "stripe" and answer.json["routing"]["skipped"] == []
    assert _metric("payfleet_provider_circuit_open", provider="stripe") == 0


def test_fifty_auto_checkouts_with_stripe_failing_half_the_time_never_oversell(
    app_for, fake_stripe, fake_monetbil, sessions
):
    client = app_for(ROUTING_CIRCUIT_FAILURES="1000")
    put_product(client, "PAGNE", on_hand=30, price=2500, currency="XAF")
    assert put_routing(client, STRIPE_FIRST).status_code == 200
    # Not retried by the stripe library: half the checkouts see Stripe fail.
    fake_stripe.fail_next(25, 500, should_retry=False)

    answers = race([lambda: auto_checkout(client, ("PAGNE", 1), currency="XAF")] * 50)

    assert Counter(a.status_code for a in answers) == {201: 30, 409: 20}, [a.text for a in answers]
    assert (product(client, "PAGNE")["on_hand"], product(client, "PAGNE")["reserved"]) == (30, 30)
    created = [a.json for a in answers if a.status_code == 201]
    by_provider = Counter(a["payment"]["provider"] for a in created)
    assert by_provider["stripe"] and by_provider["monetbil"], by_provider  # both paths ran
    payments = {
        str(p.order_id): p
        for p in _rows(sessions, "SELECT order_id, provider, status, provider_payment_id FROM payments")
    }
    intents = Counter(i["metadata"]["order_id"] for i in fake_stripe.payment_intents.values())
    widgets = set(fake_monetbil.payment_requests)
    for answer in created:
        payment = payments[answer["order_id"]]
        assert (payment.provider, payment.status) == (answer["payment"]["provider"], "pending")
        if payment.provider == "stripe":
            # Exactly one open payment: its one intent, and no Monetbil page.
            assert payment.provider_payment_id == answer["payment"]["provider_payment_id"]
            assert intents[answer["order_id"]] == 1 and answer["order_id"] not in widgets
        else:
            assert answer["routing"]["tried"][0]["outcome"] == "server_error"
            assert intents[answer["order_id"]] == 0 and answer["order_id"] in widgets
    assert scalar(sessions, "SELECT count(*) FROM orders WHERE status = 'pending_payment'") == 30


def test_the_live_ingress_counts_routing_decisions_on_metrics(ingress, fake_stripe, fake_monetbil):
    """Under gunicorn (two workers, prometheus multiprocess mode): every
    worker's decisions add up, and the circuit gauge is exposed."""
    admin = {"Authorization": ADMIN["Authorization"]}
    pagne = {"name": "Pagne", "price": 2500, "currency": "XAF", "on_hand": 20}
    assert requests.put(f"{ingress}/admin/products/PAGNE", json=pagne, headers=admin).status_code == 201
    assert requests.put(f"{ingress}/admin/routing", json={"rules": STRIPE_FIRST}, headers=admin).ok
    fake_stripe.fail_next(2, 500, should_retry=False)
    body = {"items": [{"sku": "PAGNE", "quantity": 1}], "currency": "XAF"}

    answers = [requests.post(f"{ingress}/checkout", json=body, timeout=30) for _ in range(4)]

    assert [a.status_code for a in answers] == [201] * 4, [a.text for a in answers]
    metrics = requests.get(f"{ingress}/metrics", timeout=10).text
    decisions = "payfleet_routing_decisions_total"
    assert f'{decisions}{{outcome="server_error",provider="stripe",rule="cm"}} 2.0' in metrics
    assert f'{decisions}{{outcome="started",provider="monetbil",rule="cm"}} 2.0' in metrics
    assert f'{decisions}{{outcome="started",provider="stripe",rule="cm"}} 2.0' in metrics
    assert 'payfleet_provider_circuit_open{provider="stripe"} 0.0' in metrics
