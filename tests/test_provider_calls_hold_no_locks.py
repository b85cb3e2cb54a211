"""Promise 9: nothing waits on the network while holding a row lock. The
jobs that ask Stripe and Monetbil read without locks, ask with no
transaction open, then lock, re-check and settle each order in a short
transaction of its own; a slow provider never holds an order's, a payment's
or a product's row, and an order settled by someone else during the call is
left as it is (nothing expired, no stock released twice).

Against the real PostgreSQL, the real stripe library talking to the fake
Stripe, and the real Monetbil client talking to the fake Monetbil."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from domain import events, expire_orders
from tests.conftest import eventually, scalar
from tests.fakes.stripe_server import FakeStripe
from tests.support.jobs import job_runner, make_stale, order_status, run_job, stripe_order
from tests.support.locks import SLOW, lock_probe
from tests.support.shop import (
    deliver,
    event_id_of,
    intent_event,
    monetbil_checkout,
    post_callback,
    put_product,
)
from workers.job_runner import job_gateways


def stock_of(sessions: Any, sku: str) -> tuple[int, int]:
    with sessions() as session:
        on_hand, reserved = session.execute(
            text("SELECT on_hand, reserved FROM products WHERE sku = :s"), {"s": sku}
        ).one()
    return int(on_hand), int(reserved)


def test_the_sweep_holds_no_row_lock_while_stripe_answers(
    client, sessions, settings, fake_stripe, database_url
):
    """cleanup-stale-payment-intents over open payments: a retrieve and a
    cancel per abandoned order, each slow; the orders, payments and their
    product stay lockable throughout (they were locked for the whole batch,
    and the product from the first expiry on)."""
    put_product(client, "SWP", 10)
    ids = [stripe_order(client, "SWP")[0] for _ in range(3)]
    make_stale(sessions, *ids)
    fake_stripe.delay(SLOW)
    one_at_a_time = replace(settings, provider_concurrency=1)
    with job_runner(sessions, one_at_a_time) as runner, lock_probe(database_url, ids, "SWP") as refused:
        started = time.monotonic()
        run = run_job(runner, sessions, "cleanup-stale-payment-intents")
        took = time.monotonic() - started

    assert run["state"] == "succeeded", run
    assert run["counts"]["expired"] == 3 and run["counts"]["payment_intents_canceled"] == 3, run
    assert took >= 6 * SLOW  # a retrieve and a cancel per order, one after another
    assert refused == []
    assert [order_status(sessions, order) for order in ids] == [("expired", "canceled")] * 3
    assert stock_of(sessions, "SWP") == (10, 0)


def test_the_listed_intent_sync_holds_no_row_lock_while_stripe_answers(
    client, sessions, settings, fake_stripe, database_url
):
    """Intents Stripe lists whose payment never learnt its id (found by the
    payment id in their metadata) are cancelled at Stripe and their orders
    expire, without the payment, order or product row held during the
    cancels."""
    put_product(client, "LST", 10)
    placed = [stripe_order(client, "LST") for _ in range(2)]
    ids = [order for order, _ in placed]
    make_stale(sessions, *ids)
    with sessions() as session:  # the checkouts never stored their intent ids
        session.execute(
            text("UPDATE payments SET provider_payment_id = NULL WHERE order_id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": ids},
        )
        session.commit()
    fake_stripe.delay(SLOW)
    one_at_a_time = replace(settings, provider_concurrency=1)
    with job_runner(sessions, one_at_a_time) as runner, lock_probe(database_url, ids, "LST") as refused:
        run = run_job(runner, sessions, "cleanup-stale-payment-intents")

    assert run["state"] == "succeeded", run
    assert run["counts"]["listed_known"] == 2 and run["counts"]["expired"] == 2, run
    assert refused == []
    assert [order_status(sessions, order) for order in ids] == [("expired", "canceled")] * 2
    assert [fake_stripe.get(intent)["status"] for _, intent in placed] == ["canceled"] * 2
    stored = scalar(
        sessions,
        "SELECT count(*) FROM payments WHERE order_id = ANY(CAST(:ids AS uuid[]))"
        " AND provider_payment_id IS NOT NULL",
        ids=ids,
    )
    assert stored == 2


class DuringCancel:
    """The Stripe gateway as the job uses it, with `meanwhile` run while
    the job waits on its cancel call (before the call reaches Stripe, or
    after its answer, as `before` says)."""

    def __init__(self, gateway: Any, meanwhile: Callable[[str], None], *, before: bool) -> None:
        self._gateway, self._meanwhile, self._before = gateway, meanwhile, before
        self.ran: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gateway, name)

    def cancel_payment_intent(self, intent_id: str, *, reason: str, idempotency_key: str) -> Any:
        if self._before:
            self._run(intent_id)
        answer = self._gateway.cancel_payment_intent(
            intent_id, reason=reason, idempotency_key=idempotency_key
        )
        if not self._before:
            self._run(intent_id)
        return answer

    def _run(self, intent_id: str) -> None:
        if not self.ran:
            self.ran.append(intent_id)
            self._meanwhile(intent_id)


def apply_with_patience(sessions: Any, event_id: int) -> str:
    """What the worker does with a stored event, waiting at most 2 s for a
    lock (a row the job held across its call would fail it here, instead
    of hanging the test)."""
    with sessions() as session:
        session.execute(text("SET LOCAL lock_timeout = '2s'"))
        status = events.apply_event(session, event_id)
        session.commit()
    return status


def test_an_order_paid_by_a_webhook_while_the_sweep_cancels_is_paid_not_expired(
    client, sessions, settings, fake_stripe: FakeStripe
):
    """While the sweep's cancel is on its way, the customer pays and the
    webhook is applied (it needs the payment's and order's locks: the job
    must not hold them). Stripe then refuses the cancel; the sweep reads the
    intent again and finds it succeeded: the order is paid once, nothing
    expired, the units sold once."""
    put_product(client, "WHK", 5)
    order, intent = stripe_order(client, "WHK", 2)
    make_stale(sessions, order)

    def customer_pays(intent_id: str) -> None:
        fake_stripe.set_status(intent_id, "succeeded")
        body = intent_event("payment_intent.succeeded", intent_id)
        assert deliver(client, body).status_code == 200
        event_id = scalar(
            sessions, "SELECT id FROM provider_events WHERE event_key = :k", k=event_id_of(body)
        )
        assert apply_with_patience(sessions, int(event_id)) == "processed"

    def twisted(real: Any) -> Any:
        return replace(real, stripe=DuringCancel(real.stripe, customer_pays, before=True))

    with job_runner(sessions, settings, gateways=twisted) as runner:
        run = run_job(runner, sessions, "cleanup-stale-payment-intents")

    assert run["state"] == "succeeded", run
    assert run["counts"].get("expired", 0) == 0 and run["counts"]["changed_meanwhile"] == 1, run
    assert order_status(sessions, order) == ("paid", "succeeded")
    assert (fake_stripe.get(intent) or {}).get("status") == "succeeded"
    sales = scalar(
        sessions, "SELECT count(*) FROM stock_movements WHERE reference = :o AND type = 'sale'", o=order
    )
    assert sales == 1
    assert stock_of(sessions, "WHK") == (3, 0)


def test_an_order_the_expire_job_expires_while_the_sweep_cancels_is_released_once(
    client, sessions, settings, fake_stripe
):
    """The expire job settles the order while the sweep's cancel is out:
    the sweep's re-check finds it expired and releases nothing more (another
    order's hold on the same SKU stays whole)."""
    put_product(client, "TWO", 5)
    order, _ = stripe_order(client, "TWO", 2)
    other, _ = stripe_order(client, "TWO", 3)  # fresh: its hold must stay
    make_stale(sessions, order)

    def expire_job_runs(intent_id: str) -> None:
        """What expire-stale-orders does for the order (its steps, in this thread)."""
        now = datetime.now(UTC)
        with sessions() as session:
            [stale] = expire_orders.stale_orders(session, now, after=None, limit=10)
        verdict = expire_orders.ask_provider(job_gateways(settings).stripe, None, stale, run_id=0)
        with sessions() as session:
            session.execute(text("SET LOCAL lock_timeout = '2s'"))
            counts = expire_orders.settle(session, stale, verdict, now, timedelta(days=1))
            session.commit()
        assert counts["expired"] == 1 and counts["units_released"] == 2

    def twisted(real: Any) -> Any:
        return replace(real, stripe=DuringCancel(real.stripe, expire_job_runs, before=False))

    with job_runner(sessions, settings, gateways=twisted) as runner:
        run = run_job(runner, sessions, "cleanup-stale-payment-intents")

    assert run["state"] == "succeeded", run
    assert run["counts"]["changed_meanwhile"] == 1 and run["counts"].get("expired", 0) == 0, run
    assert order_status(sessions, order) == ("expired", "canceled")
    assert order_status(sessions, other) == ("pending_payment", "pending")
    assert stock_of(sessions, "TWO") == (5, 3)
    released = scalar(
        sessions,
        "SELECT count(*) FROM order_transitions WHERE order_id = :o AND to_status = 'expired'",
        o=order,
    )
    assert released == 1


def test_expire_holds_no_row_lock_while_monetbil_answers(
    client, sessions, settings, fake_monetbil, database_url, worker
):
    """expire-stale-orders asks Monetbil's check-payment for a stale order
    with no transaction open: a slow answer holds none of its rows."""
    put_product(client, "MBL", on_hand=5, currency="XAF", price=5000)
    ids = []
    for _ in range(2):
        answer = monetbil_checkout(client, ("MBL", 1))
        assert answer.status_code == 201, answer.text
        order = str(answer.json["order_id"])
        callback = fake_monetbil.pay(order, status="pending")  # teaches the payment its transaction id
        assert post_callback(client, callback).text == "received"
        fake_monetbil.set_transaction(callback["transaction_id"], 0, amount="5000", currency="XAF")
        ids.append(order)
    eventually(
        lambda: (
            scalar(
                sessions,
                "SELECT count(*) FROM payments WHERE order_id = ANY(CAST(:ids AS uuid[]))"
                " AND status = 'processing'",
                ids=ids,
            )
            == 2
        )
    )
    make_stale(sessions, *ids)
    fake_monetbil.delay(SLOW)
    one_at_a_time = replace(settings, provider_concurrency=1)
    with job_runner(sessions, one_at_a_time) as runner, lock_probe(database_url, ids, "MBL") as refused:
        run = run_job(runner, sessions, "expire-stale-orders")

    assert run["state"] == "succeeded" and run["counts"]["expired"] == 2, run
    assert refused == []
    assert [order_status(sessions, order) for order in ids] == [("expired", "failed")] * 2
    assert stock_of(sessions, "MBL") == (5, 0)
