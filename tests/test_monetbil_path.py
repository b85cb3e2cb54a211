"""Monetbil mobile money through the real stack: checkout → payment URL →
signed callback → check-payment confirms → paid order and sold stock."""

from __future__ import annotations

import json

import pytest
from falcon import testing

from ingress.app import collaborators, create_app
from payfleet.platform.config import load_settings
from tests.conftest import MONETBIL_KEY, eventually, free_port, scalar
from tests.support.shop import monetbil_checkout, order, post_callback, product, put_product


def test_a_confirmed_success_pays_the_order_and_sells_the_stock(client, fake_monetbil, worker, sessions):
    put_product(client, "PAGNE", on_hand=4, currency="XAF", price=5000)
    answer = monetbil_checkout(client, ("PAGNE", 2))
    assert answer.status_code == 201, answer.text
    placed = answer.json
    assert placed["payment"]["payment_url"].startswith(fake_monetbil.base_url)
    sent = fake_monetbil.payment_request(placed["order_id"])
    assert (sent["amount"], sent["currency"], sent["notify_url"]) == (
        "10000",
        "XAF",
        "http://shop.test/webhooks/monetbil",
    )

    callback = fake_monetbil.pay(placed["order_id"], status="success")
    delivered = post_callback(client, callback)
    assert (delivered.status_code, delivered.text) == (200, "received")

    paid = eventually(lambda: (o := order(client, placed["order_id"]))["status"] == "paid" and o)
    assert paid["payment"]["status"] == "succeeded"
    assert paid["payment"]["provider_payment_id"] == callback["transaction_id"]
    assert fake_monetbil.checks(callback["transaction_id"]) == 1
    assert (product(client, "PAGNE")["on_hand"], product(client, "PAGNE")["reserved"]) == (2, 0)
    assert scalar(sessions, "SELECT count(*) FROM stock_movements WHERE type = 'sale'") == 1


# --- a Monetbil outage at checkout tells what failed, never the key or the address --------


def _monetbil_broken(fake_monetbil, fault: str) -> str:
    """Break Monetbil the way `fault` says; the base address the app should use."""
    if fault == "http-500":
        fake_monetbil.fail_all(500)
    elif fault == "timeout":
        fake_monetbil.delay(2.5)
    else:  # down: nothing listens there any more
        return f"http://127.0.0.1:{free_port()}"
    return str(fake_monetbil.base_url)


@pytest.mark.parametrize(
    ("fault", "said"),
    [("http-500", "answered HTTP 500"), ("timeout", "timed out"), ("down", "refused the connection")],
)
def test_a_monetbil_outage_at_checkout_names_the_failure_but_not_the_key_or_address(
    env, fake_monetbil, sessions, fault, said
):
    base = _monetbil_broken(fake_monetbil, fault)
    parts = collaborators(load_settings({**env, "MONETBIL_API_BASE": base, "MONETBIL_TIMEOUT_SECONDS": "1"}))
    try:
        client = testing.TestClient(create_app(parts))
        put_product(client, "PAGNE", on_hand=5, currency="XAF", price=5000)

        answer = monetbil_checkout(client, ("PAGNE", 2))

        assert (answer.status_code, answer.json["error"]) == (502, "provider_error"), answer.text
        timeline = order(client, str(scalar(sessions, "SELECT id FROM orders")))["timeline"]
    finally:
        fake_monetbil.delay(None)
        parts.engine.dispose()
    detail = answer.json["detail"]
    assert "Monetbil" in detail and said in detail, detail
    failures = [entry["reason"] for entry in timeline if entry.get("to") == "failed"]
    assert failures and all(said in reason for reason in failures), timeline
    for text in (answer.text, json.dumps(timeline)):
        assert MONETBIL_KEY not in text
        assert base not in text and "127.0.0.1" not in text
