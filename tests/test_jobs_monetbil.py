"""expire-stale-orders for Monetbil orders: check-payment is asked first, and
only a success for the payment's full amount pays the order."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tests.conftest import eventually, scalar
from tests.support.jobs import job_runner, make_stale, order_status, run_job
from tests.support.shop import monetbil_checkout, post_callback, product, put_product


def _order(client) -> str:
    answer = monetbil_checkout(client, ("PAGNE", 1))
    assert answer.status_code == 201, answer.text
    return str(answer.json["order_id"])


def _pending(client, sessions, fake_monetbil, order_id: str) -> Any:
    """A `pending` callback teaches the payment its Monetbil transaction id."""
    callback = fake_monetbil.pay(order_id, status="pending")
    assert post_callback(client, callback).text == "received"
    eventually(
        lambda: scalar(sessions, "SELECT provider_payment_id FROM payments WHERE order_id = :o", o=order_id)
    )
    return callback


def test_expire_asks_monetbil_and_pays_only_a_full_success(client, sessions, settings, fake_monetbil, worker):
    put_product(client, "PAGNE", on_hand=10, currency="XAF", price=5000)
    orders = {name: _order(client) for name in ("untouched", "paid", "underpaid", "failed", "pending")}
    learned = {
        name: _pending(client, sessions, fake_monetbil, orders[name])
        for name in orders
        if name != "untouched"
    }
    fake_monetbil.set_transaction(learned["paid"]["transaction_id"], 1, amount="5000", currency="XAF")
    fake_monetbil.set_transaction(learned["underpaid"]["transaction_id"], 1, amount="1", currency="XAF")
    fake_monetbil.set_transaction(learned["failed"]["transaction_id"], 0, amount="5000", currency="XAF")
    make_stale(sessions, *orders.values())

    with job_runner(sessions, settings) as runner:
        run = run_job(runner, sessions, "expire-stale-orders")

    assert run["state"] == "succeeded", run
    assert order_status(sessions, orders["untouched"]) == ("expired", "canceled")
    assert order_status(sessions, orders["paid"]) == ("paid", "succeeded")
    assert order_status(sessions, orders["underpaid"]) == ("expired", "failed")
    assert order_status(sessions, orders["failed"]) == ("expired", "failed")
    assert order_status(sessions, orders["pending"]) == ("pending_payment", "processing")
    assert run["counts"]["underpaid"] == 1
    assert run["counts"]["left_processing"] == 1
    # Ten on hand: one sold, one still held (pending), three given back.
    stock = product(client, "PAGNE")
    assert (stock["on_hand"], stock["reserved"]) == (9, 1)


def test_an_order_monetbil_keeps_calling_pending_needs_attention_then_a_success_fills_it(
    client, sessions, settings, fake_monetbil, worker
):
    """Issue 9, item 7: past its window plus PENDING_ATTENTION_AFTER_SECONDS,
    a Monetbil payment check-payment still calls pending is no longer asked
    about: the order needs attention (reason in its timeline, counted), its
    unit still held. The customer's payment then goes through: the order is
    paid from that hold, one sale."""
    put_product(client, "PAGNE", on_hand=10, currency="XAF", price=5000)
    order_id = _order(client)
    callback = _pending(client, sessions, fake_monetbil, order_id)
    make_stale(sessions, order_id, age="2 hours")  # window ended 1.5 h ago
    patient = replace(settings, pending_attention_after_seconds=3600)

    with job_runner(sessions, patient) as runner:
        run = run_job(runner, sessions, "expire-stale-orders")
        again = run_job(runner, sessions, "expire-stale-orders")

    assert run["state"] == "succeeded", run
    assert run["counts"]["needs_attention"] == 1 and "left_processing" not in run["counts"], run
    assert again["counts"].get("examined", 0) == 0
    assert order_status(sessions, order_id) == ("needs_attention", "processing")
    reason = scalar(
        sessions,
        "SELECT reason FROM order_transitions WHERE order_id = :o AND to_status = 'needs_attention'",
        o=order_id,
    )
    assert "Monetbil says pending" in reason
    assert (product(client, "PAGNE")["on_hand"], product(client, "PAGNE")["reserved"]) == (10, 1)

    paid = fake_monetbil.pay(order_id, transaction_id=callback["transaction_id"])
    assert post_callback(client, paid).text == "received"
    eventually(lambda: order_status(sessions, order_id) == ("paid", "succeeded"))
    assert (product(client, "PAGNE")["on_hand"], product(client, "PAGNE")["reserved"]) == (9, 0)
