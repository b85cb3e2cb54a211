"""Small drivers for tests: put a product, check out, deliver a signed
Stripe event, read stock and orders back, all through the public HTTP API."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from falcon import testing

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
