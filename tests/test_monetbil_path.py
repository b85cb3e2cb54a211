"""Monetbil mobile money through the real stack: checkout → payment URL →
signed callback → check-payment confirms → paid order and sold stock."""

from __future__ import annotations

from tests.conftest import eventually, scalar
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
