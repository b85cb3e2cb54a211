"""Promise 9: rows are locked in one global order, products by SKU. Every
path that locks several product rows (checkout's reservations, the event
path's sales and releases, release-expired-reservations over a batch of
orders, an expiry) takes them sorted by SKU across everything its
transaction touches, so two of them never wait on each other in a cycle
(PostgreSQL would abort one with DeadlockDetected).

Against the real PostgreSQL, checkouts through the HTTP API (with the fake
Stripe), stored events applied as the worker applies them, and the release
job run as a worker runs it."""

from __future__ import annotations

import functools
import random
import threading
import uuid
from collections.abc import Callable
from typing import Any

from falcon import testing
from sqlalchemy import text

from domain.events import apply_event, apply_events
from tests.conftest import eventually, scalar
from tests.support.jobs import job_runner, make_stale, run_job
from tests.support.shop import checkout, deliver, event_id_of, intent_event, place, put_product

SKUS = ("LK-A", "LK-B", "LK-C", "LK-D", "LK-E")


def waiting_on(sessions: Any, statement: str) -> int:
    """How many sessions of this database wait for a row lock in a statement
    starting with `statement`."""
    return int(
        scalar(
            sessions,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE :q",
            q=f"{statement}%",
        )
    )


def assert_stock_consistent(sessions: Any) -> None:
    """For every SKU: its movements sum to on_hand, reserved is what the
    active reservations hold, and 0 <= reserved <= on_hand."""
    with sessions() as session:
        rows = session.execute(
            text(
                "SELECT p.sku, p.on_hand, p.reserved,"
                " (SELECT coalesce(sum(quantity), 0) FROM stock_movements m WHERE m.sku = p.sku),"
                " (SELECT coalesce(sum(quantity), 0) FROM stock_reservations r"
                "   WHERE r.sku = p.sku AND r.status = 'active')"
                " FROM products p ORDER BY p.sku"
            )
        ).all()
    for sku, on_hand, reserved, ledger, held in rows:
        assert ledger == on_hand, f"{sku}: the ledger sums to {ledger}, on_hand is {on_hand}"
        assert reserved == held, f"{sku}: reserved {reserved}, active reservations hold {held}"
        assert 0 <= reserved <= on_hand, sku


def in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start `work` on its own thread; the list gets what it returned or raised."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as error:  # kept, so the assertion shows it
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def stale_pair(client: testing.TestClient) -> tuple[str, str]:
    """Two orders, one of LK-E and one of LK-A, the LK-E one first by id
    (the order the release job visits them in)."""
    while True:
        later_sku, _ = place(client, ("LK-E", 1))
        earlier_sku, _ = place(client, ("LK-A", 1))
        if uuid.UUID(later_sku) < uuid.UUID(earlier_sku):
            return later_sku, earlier_sku


def test_the_release_job_locks_a_batch_of_orders_products_in_sku_order(client, sessions, settings):
    """Released order by order, the job would lock LK-E (its first order's),
    then LK-A (its second's), while a checkout of both locks LK-A, then LK-E:
    the job holding LK-E and waiting for LK-A, the checkout holding LK-A and
    waiting for LK-E, PostgreSQL aborts one of them. A row lock this test
    holds on the second order's reservation stops the job between its two
    orders (any pause there, a busy CPU, allows the same interleaving) while
    the checkout runs; then the job goes on."""
    for sku in SKUS:
        put_product(client, sku, on_hand=100)
    first, second = stale_pair(client)
    make_stale(sessions, first, second, age="31 minutes")
    with job_runner(sessions, settings) as runner, sessions() as blocker:
        blocker.execute(
            text("SELECT 1 FROM stock_reservations WHERE order_id = :o FOR UPDATE"), {"o": second}
        )
        job, job_outcome = in_thread(lambda: run_job(runner, sessions, "release-expired-reservations"))
        eventually(lambda: waiting_on(sessions, "UPDATE stock_reservations") == 1, timeout=10)
        shopper, checkout_outcome = in_thread(lambda: checkout(client, ("LK-A", 2), ("LK-E", 2)))
        # The checkout either completes, or waits on a product row the job holds.
        eventually(lambda: checkout_outcome or waiting_on(sessions, "UPDATE products") == 1, timeout=10)
        blocker.commit()
        for thread in (job, shopper):
            thread.join(timeout=30)
            assert not thread.is_alive()

    [run], [answer] = job_outcome, checkout_outcome
    assert isinstance(run, dict) and run["state"] == "succeeded", run
    assert run["counts"] == {"orders_released": 2, "units_released": 2}, run
    assert isinstance(answer, testing.Result) and answer.status_code == 201, answer
    assert_stock_consistent(sessions)


def pending_orders(client: testing.TestClient, count: int, rng: random.Random) -> list[tuple[str, str]]:
    """`count` Stripe orders of one to three random SKUs each."""
    placed = []
    for _ in range(count):
        lines = [(sku, rng.randint(1, 2)) for sku in rng.sample(SKUS, rng.randint(1, 3))]
        placed.append(place(client, *lines))
    return placed


def store_events(client: testing.TestClient, sessions: Any, bodies: list[bytes]) -> list[int]:
    ids = []
    for body in bodies:
        assert deliver(client, body).status_code == 200
        key = event_id_of(body)
        ids.append(int(scalar(sessions, "SELECT id FROM provider_events WHERE event_key = :k", k=key)))
    return ids


def apply_as_the_worker(sessions: Any, event_ids: list[int]) -> dict[int, str]:
    """One batch in one transaction, then what it left out alone (each in
    its own), as the apply_event actor does."""
    with sessions.begin() as session:
        settled = apply_events(session, event_ids)
    for event_id in event_ids:
        if event_id not in settled:
            with sessions.begin() as session:
                settled[event_id] = apply_event(session, event_id)
    return settled


def test_release_job_checkouts_and_events_on_the_same_skus_never_deadlock(client, sessions, settings):
    """Rounds of: the release job (stale orders of random SKUs), checkouts
    of random SKU sets, and stored successes and cancels applied in batches
    and alone, all released together on the same five SKUs. Every one
    completes (no DeadlockDetected anywhere), and stock stays consistent."""
    rng = random.Random(9)
    for sku in SKUS:
        put_product(client, sku, on_hand=2000)
    with job_runner(sessions, settings) as runner:
        for _ in range(3):
            stale = pending_orders(client, 20, rng)
            make_stale(sessions, *(order for order, _ in stale), age="31 minutes")
            paying = pending_orders(client, 12, rng)
            # Successes and cancels, some for orders the job is releasing.
            bodies = [
                intent_event("payment_intent.succeeded" if n % 3 else "payment_intent.canceled", intent)
                for n, (_, intent) in enumerate(paying + stale[:4])
            ]
            event_ids = store_events(client, sessions, bodies)
            work: list[Callable[[], Any]] = [
                lambda: run_job(runner, sessions, "release-expired-reservations")
            ]
            for _ in range(12):
                lines = [(sku, rng.randint(1, 2)) for sku in rng.sample(SKUS, rng.randint(2, 5))]
                work.append(functools.partial(checkout, client, *lines))
            for n in range(0, len(event_ids), 4):
                work.append(functools.partial(apply_as_the_worker, sessions, event_ids[n : n + 4]))
            outcomes = run_all_at_once(work)

            failures = [o for o in outcomes if isinstance(o, BaseException)]
            assert failures == [], [repr(f)[:300] for f in failures]
            run, answers, applied = outcomes[0], outcomes[1:13], outcomes[13:]
            assert run["state"] == "succeeded", run["error"]
            # The job skips an order an event holds; every other stale order is its.
            assert 16 <= run["counts"]["orders_released"] <= 20, run
            assert [a.status_code for a in answers] == [201] * 12, [
                a.text for a in answers if a.status_code != 201
            ]
            assert all(set(batch.values()) == {"processed"} for batch in applied), applied
            still_held = scalar(
                sessions,
                "SELECT count(*) FROM stock_reservations WHERE status = 'active'"
                " AND order_id = ANY(CAST(:ids AS uuid[]))",
                ids=[order for order, _ in stale],
            )
            assert still_held == 0
            assert_stock_consistent(sessions)


def run_all_at_once(work: list[Callable[[], Any]]) -> list[Any]:
    """Each callable on its own thread, released together by a barrier; what
    each returned or raised."""
    gate = threading.Barrier(len(work))
    outcomes: list[Any] = [None] * len(work)

    def run(index: int) -> None:
        gate.wait()
        try:
            outcomes[index] = work[index]()
        except BaseException as error:  # kept, so the assertion shows it
            outcomes[index] = error

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a racing call never finished"
    return outcomes


def test_a_batch_locks_its_sales_products_in_sku_order_in_one_statement(client, sessions):
    """A batch's sales lock their product rows and change them in one
    statement (stock.sell_reserved). The rows must still be locked in SKU
    order, whatever order the UPDATE's plan visits them in. The order buys
    LO-Z and LO-A, LO-Z comes first on disk, and a lock this test holds on
    LO-A stops the batch at its first product. While it waits there it must
    not hold LO-Z: a checkout of LO-A and LO-Z, holding LO-A, would then
    wait on it, a cycle. (Without the ORDER BY, this test fails.)"""
    put_product(client, "LO-Z", on_hand=10)
    put_product(client, "LO-A", on_hand=10)
    order, intent = place(client, ("LO-Z", 1), ("LO-A", 1))
    # LO-A's latest row version is now the last on disk: a scan in disk
    # order meets LO-Z first.
    put_product(client, "LO-A", on_hand=11)
    [event_id] = store_events(client, sessions, [intent_event("payment_intent.succeeded", intent)])
    with sessions() as blocker:
        blocker.execute(text("SELECT 1 FROM products WHERE sku = 'LO-A' FOR UPDATE"))
        batch, outcome = in_thread(lambda: apply_as_the_worker(sessions, [event_id]))
        eventually(lambda: waiting_on(sessions, "WITH locked") == 1, timeout=10)
        with sessions() as probe:
            # NOWAIT: raises at once if the waiting batch holds LO-Z.
            probe.execute(text("SELECT 1 FROM products WHERE sku = 'LO-Z' FOR UPDATE NOWAIT"))
            probe.rollback()
        blocker.commit()
        batch.join(timeout=30)
        assert not batch.is_alive()
    assert outcome == [{event_id: "processed"}], outcome
    assert scalar(sessions, "SELECT status FROM orders WHERE id = :o", o=order) == "paid"
    assert_stock_consistent(sessions)


def test_a_batch_locks_all_its_events_before_any_of_their_payments(client, sessions):
    """A batch locks its events and their payments in one statement, in the
    order two statements took them: every event (by id), then the payments.
    A lock this test holds on the batch's second event stops the batch in
    that statement. While it waits there it must not hold the first event's
    payment: a path that locks that payment, then wants the second event,
    would wait on it, a cycle. (Locking each event's row and its payment's
    together, row by row, fails this test.)"""
    put_product(client, "LE-A", on_hand=10)
    _, first_intent = place(client, ("LE-A", 1))
    second_order, second_intent = place(client, ("LE-A", 1))
    first, second = store_events(
        client,
        sessions,
        [
            intent_event("payment_intent.succeeded", first_intent),
            intent_event("payment_intent.succeeded", second_intent),
        ],
    )
    first_payment = scalar(
        sessions,
        "SELECT p.id FROM provider_events e JOIN payments p"
        " ON p.provider_payment_id = e.provider_payment_id WHERE e.id = :e",
        e=first,
    )
    assert first_payment is not None
    with sessions() as blocker:
        blocker.execute(text("SELECT 1 FROM provider_events WHERE id = :e FOR UPDATE"), {"e": second})
        batch, outcome = in_thread(lambda: apply_as_the_worker(sessions, [first, second]))
        eventually(lambda: waiting_on(sessions, "WITH locked_events") == 1, timeout=10)
        with sessions() as probe:
            # NOWAIT: raises at once if the waiting batch holds the payment.
            probe.execute(
                text("SELECT 1 FROM payments WHERE id = :p FOR UPDATE NOWAIT"), {"p": first_payment}
            )
            probe.rollback()
        blocker.commit()
        batch.join(timeout=30)
        assert not batch.is_alive()
    assert outcome == [{first: "processed", second: "processed"}], outcome
    assert scalar(sessions, "SELECT status FROM orders WHERE id = :o", o=second_order) == "paid"
    assert_stock_consistent(sessions)


def test_a_batch_locks_all_its_orders_before_it_consumes_any_reservation(client, sessions):
    """A batch locks its orders and consumes the paid ones' reservations in
    one statement, in the order two statements took them: every order (by
    id), then the reservations. A lock this test holds on the later order
    stops the batch in that statement; while it waits there, the earlier
    order's reservation must not be held. (A statement that consumes the
    reservations before every order is locked fails this test.)"""
    put_product(client, "LR-A", on_hand=10)
    placed = [place(client, ("LR-A", 1)) for _ in range(2)]
    (early, early_intent), (late, late_intent) = sorted(placed, key=lambda pair: uuid.UUID(pair[0]))
    events = store_events(
        client,
        sessions,
        [
            intent_event("payment_intent.succeeded", early_intent),
            intent_event("payment_intent.succeeded", late_intent),
        ],
    )
    with sessions() as blocker:
        blocker.execute(text("SELECT 1 FROM orders WHERE id = :o FOR UPDATE"), {"o": late})
        batch, outcome = in_thread(lambda: apply_as_the_worker(sessions, events))
        eventually(lambda: waiting_on(sessions, "WITH locked_orders") == 1, timeout=10)
        with sessions() as probe:
            # NOWAIT: raises at once if the waiting batch holds the reservation.
            held = "SELECT 1 FROM stock_reservations WHERE order_id = :o FOR UPDATE NOWAIT"
            assert probe.execute(text(held), {"o": early}).all() == [(1,)]
            probe.rollback()
        blocker.commit()
        batch.join(timeout=30)
        assert not batch.is_alive()
    assert outcome == [dict.fromkeys(events, "processed")], outcome
    for order in (early, late):
        assert scalar(sessions, "SELECT status FROM orders WHERE id = :o", o=order) == "paid"
    consumed = "SELECT count(*) FROM stock_reservations WHERE status = 'consumed' AND order_id IN (:a, :b)"
    assert scalar(sessions, consumed, a=early, b=late) == 2
    assert_stock_consistent(sessions)
