"""Small drivers for tests: put a product, check out, deliver a signed
Stripe event, read stock and orders back, all through the public HTTP API."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlencode

import pytest
from falcon import testing
from sqlalchemy import text

from tests.conftest import eventually
from tests.support.stripe_signing import sign_stripe_payload, stripe_event

ADMIN = {"Authorization": "Bearer test-admin-token"}
SECRET = "whsec_test_current"


def put_product(client: testing.TestClient, sku: str, on_hand: int, price: int = 1500, **extra: Any) -> Any:
    body = {"name": f"Product {sku}", "price": price, "currency": "EUR", "on_hand": on_hand, **extra}
    result = client.simulate_put(f"/admin/products/{sku}", json=body, headers=ADMIN)
    assert result.status_code in (200, 201), result.text
    return result.json


def product(client: testing.TestClient, sku: str) -> Any:
    return client.simulate_get(f"/admin/products/{sku}", headers=ADMIN).json


def order(client: testing.TestClient, order_id: str) -> Any:
    return client.simulate_get(f"/admin/orders/{order_id}", headers=ADMIN).json


def checkout(client: testing.TestClient, *lines: tuple[str, int]) -> testing.Result:
    body = {
        "items": [{"sku": sku, "quantity": quantity} for sku, quantity in lines],
        "provider": "stripe",
        "currency": "EUR",
        "customer": {"email": "ada@example.com", "phone": "+33600000000"},
    }
    return client.simulate_post("/checkout", json=body)


def intent_event(
    event_type: str, intent_id: str, event_id: str | None = None, status: str | None = None, **obj: Any
) -> bytes:
    body = {"id": intent_id, "object": "payment_intent", "status": status or event_type.split(".")[-1], **obj}
    return stripe_event(event_type, body, event_id=event_id)


def deliver(client: testing.TestClient, body: bytes, secret: str = SECRET, **sign: Any) -> testing.Result:
    headers = {
        "Stripe-Signature": sign_stripe_payload(body, secret, **sign),
        "Content-Type": "application/json",
    }
    return client.simulate_post("/webhooks/stripe", body=body, headers=headers)


def event_id_of(body: bytes) -> str:
    return str(json.loads(body)["id"])


def monetbil_checkout(
    client: testing.TestClient, *lines: tuple[str, int], phone: str = "+237670000000"
) -> Any:
    body = {
        "items": [{"sku": sku, "quantity": quantity} for sku, quantity in lines],
        "provider": "monetbil",
        "currency": "XAF",
        "customer": {"email": "ama@example.cm", "phone": phone},
    }
    return client.simulate_post("/checkout", json=body)


def post_callback(client: testing.TestClient, fields: dict[str, str]) -> testing.Result:
    """POST a Monetbil callback form-encoded, as Monetbil does."""
    return client.simulate_post(
        "/webhooks/monetbil",
        body=urlencode(fields),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )


def call(client: testing.TestClient, method: str, path: str, **kwargs: Any) -> testing.Result:
    """One request; an exception escaping the app (no HTTP answer) fails the test."""
    try:
        return client.simulate_request(method, path, **kwargs)
    except Exception as error:
        pytest.fail(f"{method} {path}: the app raised {type(error).__name__} instead of answering: {error}")


def place(client: testing.TestClient, *lines: tuple[str, int]) -> tuple[str, str]:
    """Check out with Stripe; returns (order id, PaymentIntent id)."""
    answer = checkout(client, *lines)
    assert answer.status_code == 201, answer.text
    return answer.json["order_id"], answer.json["payment"]["provider_payment_id"]


def settle(client: testing.TestClient, sessions: Any, body: bytes) -> int:
    """Deliver a signed event, wait until the worker applied it and the
    ingress marked it published; its row id. The mark follows the broker's
    confirm and may land after the worker is done, so a test reading the
    event right after the apply would race it."""
    answer = deliver(client, body)
    assert answer.status_code == 200, answer.text
    key = event_id_of(body)

    def done() -> Any:
        with sessions() as session:
            row = session.execute(
                text("SELECT id, status, last_error, published_at FROM provider_events WHERE event_key = :k"),
                {"k": key},
            ).one()
        return row if row.status != "received" and row.published_at is not None else None

    row = eventually(done)
    assert row.status == "processed", f"event {key} ended {row.status}: {row.last_error}"
    return int(row.id)


def race(calls: Sequence[Callable[..., testing.Result]]) -> list[testing.Result]:
    """Every call in its own thread, released together by a barrier; each
    must come back with an HTTP answer."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = calls[index]()
        except BaseException as error:  # kept, so the assertion shows it
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a racing call never finished"
    for result in results:
        assert isinstance(result, testing.Result), f"a call raised instead of answering: {result!r}"
    return results


# --- payment routing (issue 11) ---------------------------------------------------


def put_routing(client: testing.TestClient, rules: list[dict[str, Any]]) -> testing.Result:
    return client.simulate_put("/admin/routing", json={"rules": rules}, headers=ADMIN)


def auto_checkout(
    client: testing.TestClient, *lines: tuple[str, int], currency: str, country: str | None = None
) -> testing.Result:
    """Check out without naming a provider: the routing rules choose."""
    body: dict[str, Any] = {
        "items": [{"sku": sku, "quantity": quantity} for sku, quantity in lines],
        "currency": currency,
        "customer": {"email": "ama@example.cm", "phone": "+237670000000"},
    }
    if country is not None:
        body["country"] = country
    return client.simulate_post("/checkout", json=body)
