"""The payment jobs against the real PostgreSQL and RabbitMQ and the real
stripe library talking to the fake Stripe server: expiring stale orders
(also racing the payment path) and the weekly PaymentIntent sweep."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace
from typing import Any

from sqlalchemy import create_engine, text

from payfleet.platform.db import make_sessions
from tests.conftest import eventually, scalar
from tests.fakes.stripe_server import CANCELABLE_STATUSES, FakeStripe
from tests.support.jobs import job_runner, make_stale, order_status, run_job, stripe_order
from tests.support.locks import SLOW, lock_probe
from tests.support.shop import ADMIN, deliver, intent_event, product, put_product


def cancels(fake_stripe: FakeStripe, intent_id: str) -> int:
    return fake_stripe.count("POST", f"/v1/payment_intents/{intent_id}/cancel")


def test_expire_asks_stripe_first_and_expires_only_what_cannot_be_paid(
    client, sessions, settings, fake_stripe
):
    put_product(client, "TEE-M", 10)
    orders = {
        name: stripe_order(client, "TEE-M") for name in ("abandoned", "paid", "processing", "error", "fresh")
    }
    make_stale(sessions, *(order for name, (order, _) in orders.items() if name != "fresh"))
    fake_stripe.set_status(orders["paid"][1], "succeeded")  # its webhook never came
    fake_stripe.set_status(orders["processing"][1], "processing")
    # One call at a time, so that the injected failure meets one order only.
    with job_runner(sessions, replace(settings, provider_concurrency=1)) as runner:
        # Stripe's list of the batch's intents fails, and then the first
        # retrieve (the library's retries included each time): the batch
        # is asked one by one, and one order is not answered.
        fake_stripe.fail_next(6, 500)
        run = run_job(runner, sessions, "expire-stale-orders")
        assert run["state"] == "succeeded", run
        failed = [
            name
            for name, (order, _) in orders.items()
            if order_status(sessions, order) == ("pending_payment", "pending")
        ]
        again = run_job(runner, sessions, "expire-stale-orders")

    # The order whose retrieve failed is the first stale one by id (ids are
    # random: any of the four); it stayed pending for the next run.
    first = min((name for name in orders if name != "fresh"), key=lambda name: uuid.UUID(orders[name][0]))
    assert run["counts"]["examined"] == 4
    assert run["counts"]["provider_errors"] == 1
    assert run["counts"].get("left_processing", 0) == int(first != "processing")
    assert sorted(failed) == sorted({first, "processing", "fresh"})
    # After the second run every stale order is settled the way Stripe says.
    assert order_status(sessions, orders["abandoned"][0]) == ("expired", "canceled")
    assert order_status(sessions, orders["error"][0]) == ("expired", "canceled")
    assert order_status(sessions, orders["paid"][0]) == ("paid", "succeeded")
    assert order_status(sessions, orders["processing"][0]) == ("pending_payment", "pending")
    assert order_status(sessions, orders["fresh"][0]) == ("pending_payment", "pending")
    assert fake_stripe.get(orders["abandoned"][1])["cancellation_reason"] == "abandoned"
    assert cancels(fake_stripe, orders["paid"][1]) == 0
    assert again["counts"].get("expired", 0) + run["counts"].get("expired", 0) == 2
    canceled = [r["counts"].get("payment_intents_canceled", 0) for r in (run, again)]
    assert sum(canceled) == 2
    # Ten on hand: one sold, two held (processing, fresh), two given back.
    assert product(client, "TEE-M")["on_hand"] == 9
    assert product(client, "TEE-M")["reserved"] == 2


def test_expire_and_payment_race_every_order_ends_paid_or_expired(
    client, sessions, settings, fake_stripe, worker
):
    count = 40
    put_product(client, "RACE", count)
    placed = [stripe_order(client, "RACE") for _ in range(count)]
    make_stale(sessions, *(order for order, _ in placed))
    paid_at_stripe: set[str] = set()

    def customers_pay() -> None:
        # Each customer pays at the last second, if Stripe still lets them
        # (a cancelled PaymentIntent cannot succeed), and Stripe says so by webhook.
        for order_id, intent in placed[::2] + placed[1::2]:
            with fake_stripe._lock:
                if fake_stripe.get(intent)["status"] not in CANCELABLE_STATUSES:
                    continue
                fake_stripe.set_status(intent, "succeeded")
            paid_at_stripe.add(order_id)
            assert deliver(client, intent_event("payment_intent.succeeded", intent)).status_code == 200

    payer = threading.Thread(target=customers_pay)
    with job_runner(sessions, settings) as runner:
        payer.start()
        run = run_job(runner, sessions, "expire-stale-orders")
        payer.join()
        # What the job skipped because a webhook held its row is left to the payment path.
    assert run["state"] == "succeeded"

    def settled() -> bool:
        return bool(scalar(sessions, "SELECT count(*) FROM orders WHERE status = 'pending_payment'") == 0)

    eventually(settled, timeout=30)
    paid = expired = 0
    for order_id, intent in placed:
        status, payment = order_status(sessions, order_id)
        stripe_status = fake_stripe.get(intent)["status"]
        if order_id in paid_at_stripe:
            assert (status, payment, stripe_status) == ("paid", "succeeded", "succeeded"), order_id
            assert cancels(fake_stripe, intent) <= 1  # a cancel refused: it had just succeeded
            paid += 1
        else:
            assert (status, payment, stripe_status) == ("expired", "canceled", "canceled"), order_id
            expired += 1
    assert paid + expired == count
    stock = product(client, "RACE")
    assert stock["on_hand"] == count - paid and stock["reserved"] == 0
    assert (
        scalar(sessions, "SELECT count(*) FROM stock_movements WHERE sku = 'RACE' AND type = 'sale'") == paid
    )


def test_the_weekly_sweep_repairs_cancels_and_never_cancels_a_success_despite_429s(
    client, sessions, settings, fake_stripe
):
    put_product(client, "SWEEP", 20)
    missed_webhook = stripe_order(client, "SWEEP")
    abandoned = stripe_order(client, "SWEEP")
    processing = stripe_order(client, "SWEEP")
    payable = stripe_order(client, "SWEEP")
    already_paid = stripe_order(client, "SWEEP")
    make_stale(sessions, missed_webhook[0], abandoned[0], processing[0], already_paid[0])
    fake_stripe.set_status(missed_webhook[1], "succeeded")
    fake_stripe.set_status(processing[1], "processing")
    fake_stripe.set_status(already_paid[1], "succeeded")
    assert deliver(client, intent_event("payment_intent.succeeded", already_paid[1])).status_code == 200
    orphan = fake_stripe.add_payment_intent(
        metadata={"payment_id": str(uuid.uuid4())}
    )  # checkout rolled back
    foreign = fake_stripe.add_payment_intent(metadata={})  # not ours: left alone
    succeeded_orphan = fake_stripe.add_payment_intent(
        status="succeeded", metadata={"payment_id": str(uuid.uuid4())}
    )
    for n in range(120):  # enough listed intents for several pages
        fake_stripe.add_payment_intent(id=f"pi_other_{n:03d}", status="succeeded")

    fake_stripe.rate_limit(4)
    with job_runner(sessions, settings) as runner:
        run = run_job(runner, sessions, "cleanup-stale-payment-intents")
    fake_stripe.rate_limit(None)

    assert run["state"] == "succeeded", run
    assert fake_stripe.throttled > 0
    assert run["counts"].get("provider_errors", 0) == 0
    assert run["counts"]["listed"] >= 120
    assert order_status(sessions, missed_webhook[0]) == ("paid", "succeeded")
    assert order_status(sessions, abandoned[0]) == ("expired", "canceled")
    assert fake_stripe.get(abandoned[1])["status"] == "canceled"
    assert order_status(sessions, processing[0]) == ("pending_payment", "pending")
    assert order_status(sessions, payable[0]) == ("pending_payment", "pending")
    assert fake_stripe.get(payable[1])["status"] == "requires_payment_method"
    assert order_status(sessions, already_paid[0]) == ("paid", "succeeded")
    assert fake_stripe.get(orphan["id"])["status"] == "canceled"
    assert fake_stripe.get(foreign["id"])["status"] == "requires_payment_method"
    for intent in (missed_webhook[1], already_paid[1], succeeded_orphan["id"]):
        assert fake_stripe.get(intent)["status"] == "succeeded"
        assert cancels(fake_stripe, intent) == 0
    assert product(client, "SWEEP")["on_hand"] == 18


class BrieflyUncancellable:
    """Stripe as our first cancel meets it: the intent is momentarily not
    cancellable (Stripe refuses, and stores that refusal under the request's
    idempotency key for 24 hours), then cancellable again."""

    def __init__(self, gateway: Any, fake: FakeStripe) -> None:
        self._gateway, self._fake, self.refused = gateway, fake, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gateway, name)

    def cancel_payment_intent(self, intent_id: str, *, reason: str, idempotency_key: str) -> Any:
        if self.refused:
            return self._gateway.cancel_payment_intent(
                intent_id, reason=reason, idempotency_key=idempotency_key
            )
        self.refused += 1
        current = self._fake.get(intent_id)
        assert current is not None
        before = current["status"]
        self._fake.set_status(intent_id, "succeeded")
        try:
            return self._gateway.cancel_payment_intent(
                intent_id, reason=reason, idempotency_key=idempotency_key
            )
        finally:
            self._fake.set_status(intent_id, before)


def test_a_refused_cancel_is_not_replayed_by_the_next_run(client, sessions, settings, fake_stripe):
    put_product(client, "KEY", 5)
    order, intent = stripe_order(client, "KEY", 2)
    make_stale(sessions, order)

    def twisted(real: Any) -> Any:
        return replace(real, stripe=BrieflyUncancellable(real.stripe, fake_stripe))

    with job_runner(sessions, settings, gateways=twisted) as runner:
        first = run_job(runner, sessions, "expire-stale-orders")
        assert first["counts"]["provider_errors"] == 1
        assert order_status(sessions, order) == ("pending_payment", "pending")
        second = run_job(runner, sessions, "expire-stale-orders")
    assert second["counts"]["expired"] == 1 and second["counts"]["payment_intents_canceled"] == 1
    assert order_status(sessions, order) == ("expired", "canceled")
    assert fake_stripe.get(intent)["status"] == "canceled"
    assert product(client, "KEY")["reserved"] == 0
    keys = {r.header("Idempotency-Key") for r in fake_stripe.requests if r.path.endswith("/cancel")}
    assert len(keys) == 2  # one per run


def test_expire_holds_no_row_lock_while_stripe_answers(client, sessions, settings, fake_stripe, database_url):
    """Stripe answering slowly must not hold the orders' rows: a probe that
    may wait a fraction of a call for their locks gets them throughout the
    run (the run itself takes seconds)."""
    put_product(client, "SLOW", 10)
    placed = [stripe_order(client, "SLOW") for _ in range(3)]
    make_stale(sessions, *(order for order, _ in placed))
    ids = [order for order, _ in placed]
    fake_stripe.delay(SLOW)
    one_at_a_time = replace(settings, provider_concurrency=1)
    with job_runner(sessions, one_at_a_time) as runner, lock_probe(database_url, ids, "SLOW") as refused:
        started = time.monotonic()
        run = run_job(runner, sessions, "expire-stale-orders")
        took = time.monotonic() - started

    assert run["state"] == "succeeded" and run["counts"]["expired"] == 3, run
    # One after another: the batch's list, the first order's retrieve (the
    # list is read from its intent on), and a cancel per order.
    assert took >= 5 * SLOW
    assert refused == []
    assert [order_status(sessions, order) for order in ids] == [("expired", "canceled")] * 3


def attention_list(client) -> list[str]:
    answer = client.simulate_get("/admin/orders", params={"status": "needs_attention"}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return sorted(o["id"] for o in answer.json["orders"])


def last_transition(client, order_id: str) -> Any:
    timeline = client.simulate_get(f"/admin/orders/{order_id}", headers=ADMIN).json["timeline"]
    return [entry for entry in timeline if entry["kind"] == "transition"][-1]


def test_an_order_stripe_keeps_calling_pending_needs_attention_once_overdue_and_can_still_be_paid(
    client, sessions, settings, fake_stripe, worker
):
    """Issue 9, item 7: an order is not polled for ever. Past its window plus
    PENDING_ATTENTION_AFTER_SECONDS (an hour here), a payment Stripe still
    calls processing, or one Stripe keeps failing to tell about, moves the
    order to needs_attention with the reason in its timeline, counted in the
    run. Its reservation is left as it is (the money may still come); a
    success that comes later fills it from that reservation, once."""
    put_product(client, "SLOWPAY", 10)
    overdue, overdue_intent = stripe_order(client, "SLOWPAY", 2)
    recent, recent_intent = stripe_order(client, "SLOWPAY", 3)
    unknown, _ = stripe_order(client, "SLOWPAY", 1)
    make_stale(sessions, overdue, unknown, age="2 hours")  # window ended 1.5 h ago
    make_stale(sessions, recent, age="1 hour")  # window ended 30 min ago
    fake_stripe.set_status(overdue_intent, "processing")
    fake_stripe.set_status(recent_intent, "processing")
    with sessions() as session:  # an intent Stripe does not know: every retrieve fails
        session.execute(
            text("UPDATE payments SET provider_payment_id = 'pi_gone' WHERE order_id = :o"), {"o": unknown}
        )
        session.commit()
    patient = replace(settings, pending_attention_after_seconds=3600)

    with job_runner(sessions, patient) as runner:
        first = run_job(runner, sessions, "expire-stale-orders")
        second = run_job(runner, sessions, "expire-stale-orders")

    assert first["state"] == "succeeded", first
    assert first["counts"]["needs_attention"] == 2 and first["counts"]["left_processing"] == 1, first
    assert first["counts"]["provider_errors"] == 1 and first["counts"].get("expired", 0) == 0, first
    assert second["counts"]["examined"] == 1  # only the recent one is asked again
    assert attention_list(client) == sorted([overdue, unknown])
    assert order_status(sessions, overdue) == ("needs_attention", "pending")
    assert order_status(sessions, recent) == ("pending_payment", "pending")
    handed_over = last_transition(client, overdue)
    assert (handed_over["from"], handed_over["to"]) == ("pending_payment", "needs_attention")
    assert "processing" in handed_over["reason"] and "after its window" in handed_over["reason"]
    assert "keeps failing" in last_transition(client, unknown)["reason"]
    # Nothing was released: every unit is still held.
    assert (product(client, "SLOWPAY")["on_hand"], product(client, "SLOWPAY")["reserved"]) == (10, 6)

    fake_stripe.set_status(overdue_intent, "succeeded")
    assert deliver(client, intent_event("payment_intent.succeeded", overdue_intent)).status_code == 200
    eventually(lambda: order_status(sessions, overdue) == ("paid", "succeeded"))
    assert (product(client, "SLOWPAY")["on_hand"], product(client, "SLOWPAY")["reserved"]) == (8, 4)
    sales = scalar(
        sessions, "SELECT count(*) FROM stock_movements WHERE reference = :o AND type = 'sale'", o=overdue
    )
    assert sales == 1


def test_an_order_whose_row_stays_locked_elsewhere_is_left_for_the_next_run(
    client, database_url, settings, fake_stripe
):
    """A session holds a stale order's payment row (stuck, or its client
    gone): past the lock timeout that order is left for the next run and
    counted, the others are settled, and the run succeeds."""
    impatient = create_engine(database_url, connect_args={"options": "-c lock_timeout=300"})
    sessions = make_sessions(impatient)
    put_product(client, "STUCK", 10)
    ids = [stripe_order(client, "STUCK")[0] for _ in range(3)]
    make_stale(sessions, *ids)
    try:
        with job_runner(sessions, settings) as runner:
            with sessions() as holder:
                holder.execute(text("SELECT 1 FROM payments WHERE order_id = :o FOR UPDATE"), {"o": ids[0]})
                first = run_job(runner, sessions, "expire-stale-orders")
            second = run_job(runner, sessions, "expire-stale-orders")
        assert first["state"] == "succeeded", first["error"]
        assert first["counts"]["locked_elsewhere"] == 1 and first["counts"]["expired"] == 2, first
        assert second["counts"]["expired"] == 1, second
        assert [order_status(sessions, order) for order in ids] == [("expired", "canceled")] * 3
        assert product(client, "STUCK")["reserved"] == 0
    finally:
        impatient.dispose()


def test_expire_reads_a_batch_of_intents_from_one_list_call(client, sessions, settings, fake_stripe):
    """A batch's PaymentIntents come from Stripe's list, a hundred a call,
    read from the batch's first intent on: one retrieve, not one an order.
    An intent the list does not give (created before the first) is still
    retrieved on its own."""
    put_product(client, "LIST", 30)
    placed = [stripe_order(client, "LIST") for _ in range(12)]
    for minutes, (order, _) in enumerate(placed):
        make_stale(sessions, order, age=f"{120 - minutes} minutes")  # in checkout order
    # The third order's intent was created before the first's at Stripe.
    early = placed[2][1]
    fake_stripe.set_status(early, "requires_payment_method", created=int(time.time()) - 3600)
    fake_stripe.clear_requests()

    with job_runner(sessions, settings) as runner:
        run = run_job(runner, sessions, "expire-stale-orders")

    assert run["state"] == "succeeded" and run["counts"]["expired"] == 12, run
    assert run["counts"]["listed"] == 10
    reads = [r.path for r in fake_stripe.requests if r.method == "GET"]
    assert sorted(reads) == sorted(
        ["/v1/payment_intents", f"/v1/payment_intents/{placed[0][1]}", f"/v1/payment_intents/{early}"]
    )
    assert all(fake_stripe.get(intent)["status"] == "canceled" for _, intent in placed)
    assert product(client, "LIST")["reserved"] == 0
