"""Many stored events applied in one transaction (`domain.events.apply_events`)
and the group-commit thread that feeds it (`payfleet.platform.group_commit`), against
the real PostgreSQL, and through the real Dramatiq worker where it matters.

Events are stored through the signed Stripe webhook; the tests then apply
them in batches of their own choosing (and alone with `apply_event`, the path
a left-out event takes), so what each batch holds is the test's to decide.
Promises 2 (applied exactly once), 4 (never oversold, every change of
on_hand in the ledger), 5 (money only moves forward) and 9 (one lock order)
of DESIGN.md."""

from __future__ import annotations

import contextvars
import functools
import io
import json
import logging
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from sqlalchemy import text

from domain.errors import PaymentNotFound
from domain.events import apply_event, apply_events
from payfleet.platform import logs
from payfleet.platform.db import SessionTimeouts, make_engine, make_sessions
from payfleet.platform.group_commit import GroupCommit
from tests.conftest import eventually, scalar
from tests.support.shop import deliver, event_id_of, intent_event, place, put_product, race
from tests.support.stripe_signing import stripe_event

Line = tuple[str, int]

# --- drivers --------------------------------------------------------------------------


def store(client, sessions, body: bytes) -> int:
    """Deliver a signed event to the webhook; its provider_events id."""
    answer = deliver(client, body)
    assert answer.status_code == 200, answer.text
    return int(scalar(sessions, "SELECT id FROM provider_events WHERE event_key = :k", k=event_id_of(body)))


def succeeded(intent: str) -> bytes:
    return intent_event("payment_intent.succeeded", intent)


def charge_refunded(intent: str, amount: int) -> bytes:
    charge = {
        "id": f"ch_{uuid.uuid4().hex[:24]}",
        "object": "charge",
        "payment_intent": intent,
        "amount": amount,
        "amount_refunded": amount,
        "refunded": True,
        "status": "succeeded",
    }
    return stripe_event("charge.refunded", charge)


def batch(sessions, event_ids: Sequence[int]) -> dict[int, str]:
    """What the group-commit thread does: one transaction, committed."""
    with sessions() as session:
        statuses = apply_events(session, event_ids)
        session.commit()
    return statuses


def alone(sessions, event_id: int) -> str:
    """What the actor does for an event the batch left out."""
    with sessions() as session:
        status = apply_event(session, event_id)
        session.commit()
    return status


def rows(sessions, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with sessions() as session:
        return [tuple(row) for row in session.execute(text(sql), params)]


def event_state(sessions, event_id: int) -> tuple[str, int, str | None, bool]:
    """(status, attempts, payment id, processed_at set)."""
    ((status, attempts, payment_id, processed),) = rows(
        sessions,
        "SELECT status, attempts, payment_id, processed_at IS NOT NULL FROM provider_events WHERE id = :i",
        i=event_id,
    )
    return str(status), int(attempts), payment_id and str(payment_id), bool(processed)


def payment_id_of(sessions, order_id: str) -> str:
    return str(scalar(sessions, "SELECT id FROM payments WHERE order_id = :o", o=order_id))


def statuses(sessions, order_id: str) -> tuple[str, str]:
    """(order status, payment status)."""
    ((order_status, payment_status),) = rows(
        sessions,
        "SELECT o.status, p.status FROM orders o JOIN payments p ON p.order_id = o.id WHERE o.id = :o",
        o=order_id,
    )
    return str(order_status), str(payment_status)


def transitions(sessions, order_id: str) -> list[tuple[Any, ...]]:
    """The order's transitions since checkout (its creation has no `from`),
    in the order written: (subject, from, to, event id)."""
    return rows(
        sessions,
        "SELECT subject, from_status, to_status, event_id FROM order_transitions"
        " WHERE order_id = :o AND from_status IS NOT NULL ORDER BY id",
        o=order_id,
    )


def sales(sessions, order_id: str) -> list[tuple[Any, ...]]:
    """The order's sale movements: (sku, quantity), by SKU."""
    return rows(
        sessions,
        "SELECT sku, quantity FROM stock_movements WHERE type = 'sale' AND reference = :o ORDER BY sku, id",
        o=order_id,
    )


def lines_of(sessions, order_id: str) -> list[Line]:
    found = rows(
        sessions, "SELECT sku, quantity FROM order_lines WHERE order_id = :o ORDER BY sku", o=order_id
    )
    return [(str(sku), int(quantity)) for sku, quantity in found]


def stock(sessions, sku: str) -> tuple[int, int]:
    ((on_hand, reserved),) = rows(sessions, "SELECT on_hand, reserved FROM products WHERE sku = :s", s=sku)
    return int(on_hand), int(reserved)


def reservations(sessions, order_id: str) -> list[tuple[Any, ...]]:
    return rows(
        sessions,
        "SELECT sku, quantity, status FROM stock_reservations WHERE order_id = :o ORDER BY sku",
        o=order_id,
    )


def assert_sold_once(sessions, order_id: str) -> None:
    """One sale per order line, for exactly the line's units; nothing else."""
    assert sales(sessions, order_id) == [(sku, -quantity) for sku, quantity in lines_of(sessions, order_id)]


def assert_ledger(sessions) -> None:
    """For every SKU: movements by id form one chain from 0 (each before +
    quantity = after, each after = the next before) ending at on_hand;
    reserved is what active reservations hold and stays within on_hand."""
    for sku, on_hand, reserved in rows(sessions, "SELECT sku, on_hand, reserved FROM products ORDER BY sku"):
        chain = rows(
            sessions,
            "SELECT id, quantity, on_hand_before, on_hand_after FROM stock_movements"
            " WHERE sku = :s ORDER BY id",
            s=sku,
        )
        level = 0
        for movement_id, quantity, before, after in chain:
            assert before == level, (
                f"{sku}: movement {movement_id} starts at {before}, the shelf held {level}"
            )
            assert before + quantity == after, f"{sku}: movement {movement_id} does not add up"
            level = after
        assert level == on_hand, f"{sku}: the ledger ends at {level}, on_hand is {on_hand}"
        held = scalar(
            sessions,
            "SELECT coalesce(sum(quantity), 0) FROM stock_reservations WHERE sku = :s AND status = 'active'",
            s=sku,
        )
        assert reserved == held, f"{sku}: reserved {reserved}, active reservations hold {held}"
        assert 0 <= reserved <= on_hand


TABLES = {
    "provider_events": "id",
    "payments": "id",
    "orders": "id",
    "order_transitions": "id",
    "stock_reservations": "id",
    "stock_movements": "id",
    "products": "sku",
}


def snapshot(sessions) -> dict[str, list[tuple[Any, ...]]]:
    """Every row (every column) of the tables the payment path writes, once
    the ingress has marked what it published (in the background)."""
    unpublished = "SELECT count(*) FROM provider_events WHERE published_at IS NULL"
    eventually(lambda: scalar(sessions, unpublished) == 0)
    return {table: rows(sessions, f"SELECT * FROM {table} ORDER BY {key}") for table, key in TABLES.items()}


def run_together(count: int, work: Callable[[int], Any]) -> list[Any]:
    """work(0..count-1), each in its own thread, released together; what each
    returned, or the exception it raised."""
    gate = threading.Barrier(count)
    outcomes: list[Any] = [None] * count

    def run(index: int) -> None:
        gate.wait()
        try:
            outcomes[index] = work(index)
        except BaseException as error:  # kept, so the assertion shows it
            outcomes[index] = error

    # Daemons: a caller that never comes back fails the test, not the exit.
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a thread never finished"
    return outcomes


# --- 1. a batch of every kind --------------------------------------------------------------


def test_a_mixed_batch_applies_what_it_can_and_leaves_the_rest_untouched(client, sessions):
    put_product(client, "TEE-M", on_hand=10)
    put_product(client, "CAP", on_hand=5, price=900)
    earlier, earlier_intent = place(client, ("TEE-M", 1))
    normal, normal_intent = place(client, ("TEE-M", 2), ("CAP", 1))
    twice, twice_intent = place(client, ("TEE-M", 1))
    quiet, quiet_intent = place(client, ("CAP", 2))

    already = store(client, sessions, succeeded(earlier_intent))
    assert alone(sessions, already) == "processed"
    paid = store(client, sessions, succeeded(normal_intent))
    processing = store(client, sessions, intent_event("payment_intent.processing", twice_intent))
    second = store(client, sessions, succeeded(twice_intent))  # same order, later id: left out
    ignored = store(client, sessions, intent_event("payment_intent.requires_action", quiet_intent))
    unknown = store(client, sessions, succeeded("pi_nobody_knows_this_one"))
    already_before = (
        event_state(sessions, already),
        transitions(sessions, earlier),
        sales(sessions, earlier),
        statuses(sessions, earlier),
    )

    # Listed out of id order, one id twice: the first *by id* of an order's events wins.
    result = batch(sessions, [unknown, second, ignored, already, processing, paid, paid])

    assert result == {paid: "processed", processing: "processed", ignored: "ignored", already: "processed"}
    assert event_state(sessions, paid) == ("processed", 1, payment_id_of(sessions, normal), True)
    assert event_state(sessions, processing) == ("processed", 1, payment_id_of(sessions, twice), True)
    assert event_state(sessions, ignored) == ("ignored", 1, None, True)
    assert event_state(sessions, second) == ("received", 0, None, False)
    assert event_state(sessions, unknown) == ("received", 0, None, False)
    assert (
        event_state(sessions, already),
        transitions(sessions, earlier),
        sales(sessions, earlier),
        statuses(sessions, earlier),
    ) == already_before

    assert statuses(sessions, normal) == ("paid", "succeeded")
    assert transitions(sessions, normal) == [
        ("payment", "pending", "succeeded", paid),
        ("order", "pending_payment", "paid", paid),
    ]
    assert_sold_once(sessions, normal)
    assert reservations(sessions, normal) == [("CAP", 1, "consumed"), ("TEE-M", 2, "consumed")]

    assert statuses(sessions, twice) == ("pending_payment", "processing")
    assert transitions(sessions, twice) == [("payment", "pending", "processing", processing)]
    assert sales(sessions, twice) == []
    assert reservations(sessions, twice) == [("TEE-M", 1, "active")]

    assert statuses(sessions, quiet) == ("pending_payment", "pending")
    assert transitions(sessions, quiet) == []
    assert reservations(sessions, quiet) == [("CAP", 2, "active")]

    assert stock(sessions, "TEE-M") == (10 - 1 - 2, 1)
    assert stock(sessions, "CAP") == (5 - 1, 2)
    assert_ledger(sessions)

    # What the batch left out, applied alone afterwards (the actor's fallback).
    assert alone(sessions, second) == "processed"
    assert statuses(sessions, twice) == ("paid", "succeeded")
    assert transitions(sessions, twice) == [
        ("payment", "pending", "processing", processing),
        ("payment", "processing", "succeeded", second),
        ("order", "pending_payment", "paid", second),
    ]
    assert_sold_once(sessions, twice)
    assert event_state(sessions, second) == ("processed", 1, payment_id_of(sessions, twice), True)
    with pytest.raises(PaymentNotFound), sessions() as session:
        apply_event(session, unknown)
    assert event_state(sessions, unknown) == ("received", 0, None, False)

    for order_id in (earlier, normal):
        assert_sold_once(sessions, order_id)
    assert stock(sessions, "TEE-M") == (6, 0)
    assert stock(sessions, "CAP") == (4, 2)
    assert_ledger(sessions)


def test_a_batch_of_no_events_or_of_ids_never_stored_changes_nothing(client, sessions):
    put_product(client, "TEE-M", on_hand=3)
    place(client, ("TEE-M", 1))
    before = snapshot(sessions)

    assert batch(sessions, []) == {}
    assert batch(sessions, [987_654, 987_655]) == {}

    assert snapshot(sessions) == before


# --- 2 and 3. many SKUs, many units, one transaction; then again ---------------------------


PLANS: list[tuple[Line, ...]] = [
    (("SKU-A", 3), ("SKU-B", 2)),
    (("SKU-A", 4), ("SKU-C", 5)),
    (("SKU-B", 3),),
    (("SKU-A", 1), ("SKU-B", 1), ("SKU-C", 2)),
]
SHELF = {"SKU-A": 20, "SKU-B": 10, "SKU-C": 7}


def four_paid_in_one_batch(client, sessions) -> tuple[list[str], list[int], dict[int, str]]:
    """Four orders over three SKUs (two or three orders per SKU), their
    successes applied in one batch; (order ids, event ids, its answer)."""
    for sku, on_hand in SHELF.items():
        put_product(client, sku, on_hand=on_hand, low_stock_threshold=2)
    placed = [place(client, *lines) for lines in PLANS]
    event_ids = [store(client, sessions, succeeded(intent)) for _, intent in placed]
    return [order_id for order_id, _ in placed], event_ids, batch(sessions, event_ids[::-1])


def test_one_batch_sells_several_skus_and_quantities_with_one_ledger_chain_per_sku(client, sessions):
    order_ids, event_ids, result = four_paid_in_one_batch(client, sessions)

    assert result == dict.fromkeys(event_ids, "processed")
    for order_id in order_ids:
        assert statuses(sessions, order_id) == ("paid", "succeeded")
        assert_sold_once(sessions, order_id)
    sold = Counter[str]()
    for lines in PLANS:
        for sku, quantity in lines:
            sold[sku] += quantity
    for sku, on_hand in SHELF.items():
        assert stock(sessions, sku) == (on_hand - sold[sku], 0), sku
    assert stock(sessions, "SKU-C") == (0, 0)
    sale_counts = rows(
        sessions, "SELECT sku, count(*) FROM stock_movements WHERE type = 'sale' GROUP BY sku ORDER BY sku"
    )
    assert sale_counts == [("SKU-A", 3), ("SKU-B", 3), ("SKU-C", 2)]
    assert_ledger(sessions)


def test_the_same_batch_applied_twice_changes_nothing_the_second_time(client, sessions):
    _, event_ids, first = four_paid_in_one_batch(client, sessions)
    assert first == dict.fromkeys(event_ids, "processed")
    after_first = snapshot(sessions)

    assert batch(sessions, event_ids) == dict.fromkeys(event_ids, "processed")
    assert snapshot(sessions) == after_first
    for event_id in event_ids:  # and alone, as a redelivered message would be
        assert alone(sessions, event_id) == "processed"
    assert snapshot(sessions) == after_first
    assert_ledger(sessions)


# --- 4. overlapping batches from concurrent transactions -----------------------------------

OTHERS = ("SKU-A", "SKU-B", "SKU-C")


def test_overlapping_batches_in_concurrent_transactions_pay_every_order_once(client, sessions):
    """24 orders, each with a unit of HOT (stocked exactly for them) and one
    or two other SKUs; some orders also get a processing event first, or a
    second success event (Stripe may send two). Four threads apply every
    event, each in its own order (ascending, descending, shuffled) in batches
    of five, all at once; what every batch left out is applied alone after."""
    plans: list[dict[str, int]] = []
    for i in range(24):
        plan = {"HOT": 1, OTHERS[i % 3]: 1 + i % 3}
        if i % 4 == 0:
            plan[OTHERS[(i + 2) % 3]] = 2
        plans.append(plan)
    needed = Counter[str]()
    for plan in plans:
        needed.update(plan)
    for sku, units in sorted(needed.items()):
        put_product(client, sku, on_hand=units)  # exactly enough: every unit is reserved
    placed = [place(client, *sorted(plan.items())) for plan in plans]
    event_ids: list[int] = []
    for i, (_, intent) in enumerate(placed):
        if i % 6 == 1:
            event_ids.append(store(client, sessions, intent_event("payment_intent.processing", intent)))
        event_ids.append(store(client, sessions, succeeded(intent)))
        if i % 4 == 3:
            event_ids.append(store(client, sessions, succeeded(intent)))
    orders = [
        sorted(event_ids),
        sorted(event_ids, reverse=True),
        random.Random(7).sample(event_ids, len(event_ids)),
        random.Random(11).sample(event_ids, len(event_ids)),
    ]

    def apply_all(thread: int) -> list[Any]:
        outcomes: list[Any] = []
        mine = orders[thread]
        for start in range(0, len(mine), 5):
            try:
                outcomes.append(batch(sessions, mine[start : start + 5]))
            except Exception as error:
                outcomes.append(error)
        return outcomes

    outcomes = [o for per_thread in run_together(len(orders), apply_all) for o in per_thread]

    errors = [o for o in outcomes if not isinstance(o, dict)]
    assert errors == [], f"{len(errors)} of {len(outcomes)} batches failed, e.g. {errors[:1]}"
    assert {status for answer in outcomes for status in answer.values()} == {"processed"}
    left_out = rows(sessions, "SELECT id FROM provider_events WHERE status = 'received' ORDER BY id")
    for (event_id,) in left_out:
        assert alone(sessions, event_id) == "processed"

    assert rows(sessions, "SELECT status, attempts, count(*) FROM provider_events GROUP BY 1, 2") == [
        ("processed", 1, len(event_ids))
    ]
    for order_id, _ in placed:
        assert statuses(sessions, order_id) == ("paid", "succeeded")
        moved = [(subject, before, after) for subject, before, after, _ in transitions(sessions, order_id)]
        assert [m for m in moved if m[0] == "order"] == [("order", "pending_payment", "paid")], moved
        assert [m[2] for m in moved if m[0] == "payment"][-1] == "succeeded", moved
        assert sum(1 for m in moved if m[0] == "payment" and m[2] == "succeeded") == 1, moved
        assert_sold_once(sessions, order_id)
        assert all(status == "consumed" for _, _, status in reservations(sessions, order_id))
    for sku in needed:
        assert stock(sessions, sku) == (0, 0), sku
    assert_ledger(sessions)


# --- 5. a refund seen before its success ----------------------------------------------------


def test_a_refund_batched_before_its_success_ends_as_it_does_applied_alone(client, sessions):
    put_product(client, "TEE-M", on_hand=10)
    put_product(client, "CAP", on_hand=5, price=900)
    batched, batched_intent = place(client, ("TEE-M", 2), ("CAP", 1))
    single, single_intent = place(client, ("TEE-M", 2), ("CAP", 1))
    bystander, bystander_intent = place(client, ("TEE-M", 1))
    labels: dict[int, str] = {}
    for intent in (batched_intent, single_intent):
        labels[store(client, sessions, charge_refunded(intent, amount=3900))] = "refund"
        labels[store(client, sessions, succeeded(intent))] = "success"
    refund_b, success_b, refund_s, success_s = labels
    other = store(client, sessions, succeeded(bystander_intent))

    assert batch(sessions, [success_b, other, refund_b]) == {refund_b: "processed", other: "processed"}
    assert statuses(sessions, batched) == ("refunded", "refunded")
    assert event_state(sessions, success_b)[0] == "received"
    assert alone(sessions, success_b) == "processed"
    assert alone(sessions, refund_s) == "processed"
    assert alone(sessions, success_s) == "processed"

    def story(order_id: str) -> list[tuple[Any, ...]]:
        return [(s, before, after, labels[e]) for s, before, after, e in transitions(sessions, order_id)]

    assert (
        story(batched)
        == story(single)
        == [
            ("payment", "pending", "succeeded", "refund"),
            ("order", "pending_payment", "paid", "refund"),
            ("payment", "succeeded", "refunded", "refund"),
            ("order", "paid", "refunded", "refund"),
        ]
    )
    for order_id in (batched, single):
        assert statuses(sessions, order_id) == ("refunded", "refunded")
        assert_sold_once(sessions, order_id)
        assert reservations(sessions, order_id) == [("CAP", 1, "consumed"), ("TEE-M", 2, "consumed")]
    assert statuses(sessions, bystander) == ("paid", "succeeded")
    assert stock(sessions, "TEE-M") == (10 - 2 - 2 - 1, 0)
    assert stock(sessions, "CAP") == (5 - 1 - 1, 0)
    assert_ledger(sessions)


def test_late_successes_are_left_out_of_a_batch_and_take_the_stock_again_or_need_attention(client, sessions):
    """Two orders canceled (their units released) whose successes then come
    in one batch with the successes of the orders now holding those units:
    where units are free the late order takes them, where they are all held
    it needs attention; the holders are paid either way."""
    put_product(client, "TEE-M", on_hand=3)
    put_product(client, "CAP", on_hand=5, price=900)
    short, short_intent = place(client, ("TEE-M", 2))
    late, late_intent = place(client, ("CAP", 2))
    for intent in (short_intent, late_intent):
        assert alone(sessions, store(client, sessions, intent_event("payment_intent.canceled", intent))) == (
            "processed"
        )
    holder, holder_intent = place(client, ("TEE-M", 3))  # every TEE-M unit
    buyer, buyer_intent = place(client, ("CAP", 2))  # 3 CAP left free
    event_ids = [store(client, sessions, succeeded(i)) for i in (short_intent, holder_intent, late_intent)]
    event_ids.append(store(client, sessions, succeeded(buyer_intent)))

    # A late success sells without a reservation, which locks product rows
    # mid-batch: the batch leaves both out, and they are applied alone.
    late_ones = event_ids[0], event_ids[2]
    holders = event_ids[1], event_ids[3]
    assert batch(sessions, event_ids) == dict.fromkeys(holders, "processed")
    assert [event_state(sessions, event_id)[0] for event_id in late_ones] == ["received", "received"]
    assert [alone(sessions, event_id) for event_id in late_ones] == ["processed", "processed"]

    assert statuses(sessions, short) == ("needs_attention", "succeeded")
    assert sales(sessions, short) == []
    assert statuses(sessions, late) == ("paid", "succeeded")
    assert statuses(sessions, holder) == ("paid", "succeeded")
    assert statuses(sessions, buyer) == ("paid", "succeeded")
    for order_id in (late, holder, buyer):
        assert_sold_once(sessions, order_id)
    assert stock(sessions, "TEE-M") == (0, 0)
    assert stock(sessions, "CAP") == (1, 0)
    assert_ledger(sessions)


# --- 6. the group-commit thread ---------------------------------------------------------


class Boom(Exception):
    pass


def test_group_commit_hands_each_caller_the_result_for_its_own_key():
    batches: list[list[int]] = []

    def run_batch(keys: Sequence[int]) -> list[str | None]:
        batches.append(list(keys))
        time.sleep(0.002)
        return [f"done {key}" if key % 5 != 0 else None for key in keys]  # multiples of 5 left out

    group: GroupCommit[int, str | None] = GroupCommit(
        run_batch, max_size=6, linger=0.005, name="test-results"
    )

    def caller(thread: int) -> list[tuple[int, str | None]]:
        return [(key, group.call(key)) for key in range(thread * 100, thread * 100 + 8)]

    answers = run_together(10, caller)

    for pairs in answers:
        assert isinstance(pairs, list), pairs
        for key, got in pairs:
            assert got == (None if key % 5 == 0 else f"done {key}"), key
    ran = [key for keys in batches for key in keys]
    assert sorted(ran) == sorted(t * 100 + j for t in range(10) for j in range(8)), "a key ran twice or never"
    assert max(len(keys) for keys in batches) <= 6


def test_the_same_key_from_several_threads_gets_the_same_result():
    def run_batch(keys: Sequence[str]) -> list[str]:
        time.sleep(0.01)
        return [key.upper() for key in keys]

    group: GroupCommit[str, str] = GroupCommit(run_batch, max_size=8, linger=0.005, name="test-twice")

    assert run_together(4, lambda _: group.call("evt")) == ["EVT"] * 4


def test_an_error_in_a_batch_reaches_every_caller_of_that_batch_and_the_next_batch_works():
    first_running, release_first = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def run_batch(keys: Sequence[int]) -> list[int]:
        batches.append(list(keys))
        if len(batches) == 1:  # hold the thread, so the next callers queue up together
            first_running.set()
            release_first.wait(10)
        if -1 in keys:
            raise Boom(f"cannot apply {sorted(keys)}")
        return [key * 10 for key in keys]

    group: GroupCommit[int, int] = GroupCommit(run_batch, max_size=64, linger=0.005, name="test-errors")
    outcomes: dict[int, Any] = {}

    def call(key: int) -> None:
        try:
            outcomes[key] = group.call(key)
        except BaseException as error:
            outcomes[key] = error

    holder = threading.Thread(target=call, args=(0,), daemon=True)
    holder.start()
    assert first_running.wait(10)
    keys = [-1, 1, 2, 3, 4, 5]
    callers = [threading.Thread(target=call, args=(key,), daemon=True) for key in keys]
    for thread in callers:
        thread.start()
    time.sleep(0.5)  # every caller is queued behind the held batch
    release_first.set()
    for thread in [holder, *callers]:
        thread.join(timeout=10)
        assert not thread.is_alive()

    assert outcomes[0] == 0
    (failed,) = [set(b) for b in batches if -1 in b]
    assert len(failed) > 1, f"the poisoned batch held only {failed}; batches {batches}"
    errors = {id(outcomes[key]) for key in failed}
    assert len(errors) == 1 and isinstance(outcomes[-1], Boom), outcomes
    for key in keys:
        if key in failed:
            assert outcomes[key] is outcomes[-1], (key, outcomes)
        else:
            assert outcomes[key] == key * 10, (key, outcomes)
    assert run_together(1, lambda _: group.call(7)) == [70]  # the thread lives on
    assert run_together(3, lambda i: group.call(100 + i)) == [1000, 1010, 1020]


def test_concurrent_callers_with_a_slow_batch_share_batches():
    sizes: list[int] = []

    def run_batch(keys: Sequence[int]) -> list[int]:
        sizes.append(len(keys))
        time.sleep(0.02)
        return [-key for key in keys]

    group: GroupCommit[int, int] = GroupCommit(run_batch, max_size=16, linger=0.005, name="test-grouping")

    answers = run_together(8, lambda t: [group.call(t * 10 + j) for j in range(5)])

    assert answers == [[-(t * 10 + j) for j in range(5)] for t in range(8)]
    assert sum(sizes) == 40
    assert max(sizes) > 1, sizes
    assert len(sizes) <= 20, f"{len(sizes)} batches for 40 calls from 8 threads: {sizes}"


def test_without_a_linger_calls_run_side_by_side_in_their_own_threads_up_to_the_concurrency():
    # The ingress's stores: two webhooks at once commit side by side (a group
    # of one made the second wait for the first's commit: half the rate at
    # two connections); only callers beyond the concurrency wait and share.
    inside = threading.Semaphore(0)
    release = threading.Event()
    ran: list[tuple[list[int], int]] = []

    def run_batch(keys: Sequence[int]) -> list[int]:
        ran.append((list(keys), threading.get_ident()))
        inside.release()
        release.wait(10)
        return [key * 10 for key in keys]

    group: GroupCommit[int, int] = GroupCommit(
        run_batch, max_size=8, linger=0.0, name="test-side-by-side", concurrency=2
    )
    callers: dict[int, int] = {}
    answers: dict[int, int] = {}

    def call(key: int) -> None:
        callers[key] = threading.get_ident()
        answers[key] = group.call(key)

    first = [threading.Thread(target=call, args=(key,), daemon=True) for key in (1, 2)]
    for thread in first:
        thread.start()
    assert inside.acquire(timeout=5) and inside.acquire(timeout=5), "both ran at once"
    late = [threading.Thread(target=call, args=(key,), daemon=True) for key in (3, 4, 5)]
    for thread in late:
        thread.start()
    time.sleep(0.2)
    assert len(ran) == 2, f"a third call ran beside the two: {ran}"
    release.set()
    for thread in [*first, *late]:
        thread.join(timeout=10)
        assert not thread.is_alive()

    assert answers == {key: key * 10 for key in (1, 2, 3, 4, 5)}
    assert sorted((keys, ident) for keys, ident in ran[:2]) == sorted(([k], callers[k]) for k in (1, 2))
    assert sorted(key for keys, _ in ran[2:] for key in keys) == [3, 4, 5]
    assert len(ran) < 5, f"the three late callers never shared a batch: {ran}"


def test_a_batch_answering_the_wrong_number_of_results_fails_its_callers_instead_of_hanging():
    def run_batch(keys: Sequence[int]) -> list[int]:
        return [1] if len(keys) > 1 else [key * 2 for key in keys]

    group: GroupCommit[int, int] = GroupCommit(run_batch, max_size=8, linger=0.05, name="test-shape")
    outcomes = run_together(4, lambda i: _outcome(lambda: group.call(i)))
    assert all(isinstance(outcome, ValueError) or outcome == i * 2 for i, outcome in enumerate(outcomes))
    assert run_together(1, lambda _: group.call(21)) == [42]  # the thread lives on


def test_the_after_hook_runs_once_per_item_in_its_callers_context_once_the_caller_has_its_answer():
    # The worker's per-event line: written by the group's thread, but with the
    # fields (event_id, trace_id) its actor thread had bound.
    caller_of: contextvars.ContextVar[int | None] = contextvars.ContextVar("caller_of", default=None)
    returned = {key: threading.Event() for key in range(12)}
    seen: list[tuple[int, str, int | None, bool]] = []

    def after(key: int, result: str) -> None:
        # Waits for its caller to have returned: an after run before the
        # caller's future is set would block it and fail the test.
        answered = returned[key].wait(5)
        seen.append((key, result, caller_of.get(), answered))

    group: GroupCommit[int, str] = GroupCommit(
        lambda keys: [f"r{key}" for key in keys], max_size=8, linger=0.005, name="test-after", after=after
    )

    def caller(thread: int) -> list[str]:
        answers = []
        for key in (thread * 3, thread * 3 + 1, thread * 3 + 2):
            caller_of.set(key)
            answers.append(group.call(key))
            returned[key].set()
        return answers

    assert run_together(4, caller) == [[f"r{k}" for k in range(t * 3, t * 3 + 3)] for t in range(4)]
    eventually(lambda: len(seen) == 12, timeout=10)
    assert sorted(seen) == [(key, f"r{key}", key, True) for key in range(12)]


def test_the_lines_a_batchs_hooks_log_go_out_in_one_write():
    # A worker's batch logs a line per event from its hook: eight writes on
    # the log pipe were eight wake-ups of Dramatiq's supervisor.
    writes: list[str] = []

    class Pipe(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    log = logging.getLogger("payfleet.test.batch_lines")
    log.addHandler(logs.handler("worker", "json", Pipe()))
    log.propagate = False
    log.setLevel(logging.INFO)
    release = threading.Event()

    def run_batch(keys: Sequence[int]) -> list[int]:
        release.wait(5)  # the four callers queue up behind the first batch
        return list(keys)

    def after(key: int, result: int) -> None:
        log.info("item %s", key)

    group: GroupCommit[int, int] = GroupCommit(
        run_batch, max_size=8, linger=0.05, name="test-lines", after=after
    )
    try:
        first = threading.Thread(target=group.call, args=(0,), daemon=True)
        first.start()
        eventually(lambda: group._running == 1, timeout=5)
        callers = [threading.Thread(target=group.call, args=(k,), daemon=True) for k in (1, 2, 3, 4)]
        for caller in callers:
            caller.start()
        eventually(lambda: len(group._queued) == 4, timeout=5)
        release.set()
        eventually(lambda: sum(write.count("\n") for write in writes) == 5, timeout=10)
    finally:
        release.set()
        log.handlers.clear()
        log.propagate = True
    assert [[json.loads(line)["msg"] for line in write.splitlines()] for write in writes] == [
        ["item 0"],
        ["item 1", "item 2", "item 3", "item 4"],
    ]


def test_the_after_hook_is_skipped_for_a_failed_batch_and_its_own_failure_changes_no_answer():
    hooked: list[int] = []

    def run_batch(keys: Sequence[int]) -> list[int]:
        if -1 in keys:
            raise Boom("poisoned batch")
        return [key * 10 for key in keys]

    def after(key: int, result: int) -> None:
        hooked.append(key)
        if key == 2:
            raise RuntimeError("the hook broke")

    group: GroupCommit[int, int] = GroupCommit(
        run_batch, max_size=8, linger=0.005, name="test-after-errors", after=after
    )
    assert isinstance(_outcome(lambda: group.call(-1)), Boom)
    assert run_together(1, lambda _: group.call(2)) == [20]
    assert run_together(1, lambda _: group.call(3)) == [30]  # the thread lives on after the hook's error
    eventually(lambda: hooked == [2, 3], timeout=5)


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as error:
        return error


# --- 7. through the worker ------------------------------------------------------------


def test_a_burst_of_webhooks_through_the_worker_pays_each_order_once(client, sessions, worker):
    shelf = {"BURST-A": 30, "BURST-B": 25, "BURST-C": 20}
    for sku, on_hand in shelf.items():
        put_product(client, sku, on_hand=on_hand)
    skus = sorted(shelf)
    placed = [place(client, (skus[i % 3], 1 + i % 2)) for i in range(30)]
    bodies = [succeeded(intent) for _, intent in placed]
    bodies += [succeeded(intent) for _, intent in placed[:6]]  # Stripe may send two events for one change

    worker.pause()  # the burst lands at once, as a backlog does after a restart
    try:
        answers = race([lambda b=body: deliver(client, b) for body in bodies])
    finally:
        worker.resume()
    assert [a.status_code for a in answers] == [200] * len(bodies)

    eventually(
        lambda: (
            scalar(sessions, "SELECT count(*) FROM provider_events WHERE status <> 'received'") == len(bodies)
        ),
        timeout=30,
    )
    worker.broker.join("payments", min_successes=5, timeout=15_000)
    worker.join()

    assert rows(sessions, "SELECT status, attempts, count(*) FROM provider_events GROUP BY 1, 2") == [
        ("processed", 1, len(bodies))
    ]
    sold = Counter[str]()
    for order_id, _ in placed:
        assert statuses(sessions, order_id) == ("paid", "succeeded")
        assert [(s, a, b) for s, a, b, _ in transitions(sessions, order_id)] == [
            ("payment", "pending", "succeeded"),
            ("order", "pending_payment", "paid"),
        ]
        assert_sold_once(sessions, order_id)
        sold.update(dict(lines_of(sessions, order_id)))
    for sku, on_hand in shelf.items():
        assert stock(sessions, sku) == (on_hand - sold[sku], 0), sku
    assert_ledger(sessions)
    # Events settled in one transaction share its now(): some did.
    together = scalar(
        sessions, "SELECT max(n) FROM (SELECT count(*) n FROM provider_events GROUP BY processed_at) t"
    )
    assert together > 1, "every event was applied in a transaction of its own"


# --- found while testing (fails: see the docstring) ------------------------------------------


def waiting_at_transitions(sessions, count: int) -> bool:
    """Whether `count` sessions wait for a lock to write order_transitions
    (in the statement that writes a batch's payments, orders, transitions and
    verdicts together)."""
    waiting = scalar(
        sessions,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO order_transitions (%'",
    )
    return bool(waiting == count)


def test_batches_holding_a_cancel_lock_products_in_one_order_and_never_deadlock(
    client, sessions, database_url
):
    """Promise 9: rows are locked in one global order, products by SKU. A
    batch's sales lock their SKUs in order at the end (stock.sell_reserved);
    a payment_intent.canceled applied in the same batch would release its
    order's units earlier, inside the per-change loop of
    orders.plan_payment_changes (in event-id order), and hold that product
    row until the commit (this test caught it). Batch 1
    (cancel an order of BBB, pay an order of AAA) then holds BBB and wants
    AAA, while batch 2 (cancel an order of AAA, pay one of BBB) holds AAA and
    wants BBB: PostgreSQL aborts one with a deadlock. (stock.sell_unreserved,
    a late success, also locks inside that loop.) A lock held on
    order_transitions by this test makes both batches reach the point between
    the release and the sale before either goes on, an interleaving that any
    pause of a few milliseconds there allows."""
    put_product(client, "AAA", on_hand=5)
    put_product(client, "BBB", on_hand=5)
    canceled_b, intent_cb = place(client, ("BBB", 1))
    canceled_a, intent_ca = place(client, ("AAA", 1))
    paid_a, intent_pa = place(client, ("AAA", 1))
    paid_b, intent_pb = place(client, ("BBB", 1))
    cancel_b = store(client, sessions, intent_event("payment_intent.canceled", intent_cb))
    cancel_a = store(client, sessions, intent_event("payment_intent.canceled", intent_ca))
    pay_a = store(client, sessions, succeeded(intent_pa))
    pay_b = store(client, sessions, succeeded(intent_pb))
    plan = [[cancel_b, pay_a], [cancel_a, pay_b]]
    outcomes: list[Any] = [None, None]
    # The batches wait at the held table as long as the test needs, on a busy
    # machine too: no lock timeout may end that wait (only a deadlock could).
    patient = make_engine(database_url, timeouts=SessionTimeouts(lock_seconds=0))

    def run(index: int) -> None:
        try:
            outcomes[index] = batch(make_sessions(patient), plan[index])
        except Exception as error:
            outcomes[index] = error

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    with sessions() as blocker:
        blocker.execute(text("LOCK TABLE order_transitions IN SHARE MODE"))
        for count, thread in enumerate(threads, start=1):
            thread.start()
            eventually(functools.partial(waiting_at_transitions, sessions, count), timeout=10)
        blocker.commit()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    patient.dispose()

    # The cancels release stock (product locks mid-batch): left out of the
    # batches, which then lock products only at their end, in SKU order.
    assert outcomes == [{pay_a: "processed"}, {pay_b: "processed"}], (
        f"a batch failed: {[repr(o)[:300] for o in outcomes if not isinstance(o, dict)]}"
    )
    assert [alone(sessions, event_id) for event_id in (cancel_a, cancel_b)] == ["processed", "processed"]
    assert [statuses(sessions, o)[0] for o in (canceled_a, canceled_b, paid_a, paid_b)] == [
        "canceled",
        "canceled",
        "paid",
        "paid",
    ]
    assert stock(sessions, "AAA") == (4, 0)
    assert stock(sessions, "BBB") == (4, 0)
    assert_ledger(sessions)
