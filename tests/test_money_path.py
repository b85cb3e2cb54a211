"""The Stripe money path in one process: real PostgreSQL, RabbitMQ and
Dramatiq worker threads, the real stripe library against the fake Stripe."""

from __future__ import annotations

from tests.conftest import eventually
from tests.support.shop import checkout, deliver, intent_event, order, product, put_product


def test_checkout_then_succeeded_webhook_pays_the_order_and_sells_the_stock(client, fake_stripe, worker):
    put_product(client, "TEE-M", on_hand=5)
    answer = checkout(client, ("TEE-M", 2))
    assert answer.status_code == 201, answer.text
    placed = answer.json
    intent_id = placed["payment"]["provider_payment_id"]
    assert fake_stripe.get(intent_id)["metadata"]["order_id"] == placed["order_id"]
    assert placed["payment"]["client_secret"].startswith(intent_id)
    assert product(client, "TEE-M")["reserved"] == 2

    delivered = deliver(client, intent_event("payment_intent.succeeded", intent_id))
    assert delivered.status_code == 200, delivered.text
    assert delivered.json == {"received": True, "duplicate": False}

    paid = eventually(lambda: (o := order(client, placed["order_id"]))["status"] == "paid" and o)
    assert paid["payment"]["status"] == "succeeded"
    stock = product(client, "TEE-M")
    assert (stock["on_hand"], stock["reserved"], stock["available"]) == (3, 0, 3)
    sales = [e for e in paid["timeline"] if e["kind"] == "movement"]
    assert [(m["type"], m["quantity"], m["before"], m["after"]) for m in sales] == [("sale", -2, 5, 3)]
