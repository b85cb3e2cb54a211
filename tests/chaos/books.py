"""What must hold after every scenario, read over direct connections (never
through the proxies the scenario cut): money, stock, ledger and queues.

Each check names what it would catch:
- paid exactly once: an event applied twice (a redelivery after a kill or a
  cut, a duplicate) or a late `processing`/`payment_failed` moving money back;
- one `sale` per line, on_hand = initial - sold: a sale recorded twice, or
  units taken without their movement;
- reserved = open orders' lines: a reservation leaked or released twice;
- the chain: a movement written outside the row lock (a before that is not
  the previous after);
- no dead letters, no event left failed or unmatched: an outage that
  outlasted the retries instead of being waited out;
- no two runs of one scheduled slot: two schedulers both firing it."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import psycopg

from payfleet.platform.broker import build_broker
from payfleet.platform.config import load_settings
from payfleet.platform.publishing import QUEUES


def dsn_of(database_url: str) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


_READERS: dict[str, psycopg.Connection[tuple[Any, ...]]] = {}


def rows(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """One kept connection per database: the PostgreSQL server is shared
    with other suites, and a poll that opened a connection each time could
    find it full."""
    conn = _READERS.get(dsn)
    if conn is None or conn.closed:
        conn = _READERS[dsn] = _connect(dsn)
    return list(conn.execute(sql, params).fetchall())


def _connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    deadline = time.monotonic() + 30
    while True:
        try:
            return psycopg.connect(dsn, autocommit=True)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def one(dsn: str, sql: str, *params: Any) -> Any:
    return rows(dsn, sql, *params)[0][0]


def settled(dsn: str, paid: Iterable[str]) -> bool:
    """Every event has its verdict and every order that was paid for is paid."""
    wanted = list(paid)
    pending = one(dsn, "SELECT count(*) FROM provider_events WHERE status = 'received'")
    done = one(dsn, "SELECT count(*) FROM orders WHERE status = 'paid' AND id = ANY(%s::uuid[])", wanted)
    return bool(pending == 0 and done == len(wanted))


def worst_lag(dsn: str, stored_at: dict[str, float]) -> float:
    """Seconds from a success webhook's first 200 to its order turning paid
    (`stored_at` maps order id to that answer's wall clock time)."""
    paid_at = rows(
        dsn,
        "SELECT order_id::text, extract(epoch FROM min(created_at)) FROM order_transitions"
        " WHERE subject = 'order' AND to_status = 'paid' AND order_id = ANY(%s::uuid[]) GROUP BY order_id",
        list(stored_at),
    )
    return max((float(at) - stored_at[order] for order, at in paid_at), default=0.0)


def assert_books_balance(dsn: str, initial: dict[str, int], paid: set[str]) -> None:
    _assert_paid_exactly_once(dsn, paid)
    sold = _assert_one_sale_per_line(dsn, paid)
    _assert_stock(dsn, initial, sold)
    _assert_ledger_chains(dsn)
    _assert_every_event_judged(dsn)
    _assert_each_slot_fired_once(dsn)


def _assert_paid_exactly_once(dsn: str, paid: set[str]) -> None:
    now_paid = {
        order
        for order, payment in rows(
            dsn,
            "SELECT o.id::text, p.status FROM orders o JOIN payments p ON p.order_id = o.id"
            " WHERE o.status = 'paid'",
        )
        if payment == "succeeded"
    }
    assert now_paid == paid, f"paid now {len(now_paid)}, paid for {len(paid)}: {sorted(now_paid ^ paid)[:5]}"
    twice = rows(
        dsn,
        "SELECT order_id::text, subject, count(*) FROM order_transitions"
        " WHERE (subject, to_status) IN (('order', 'paid'), ('payment', 'succeeded'))"
        " GROUP BY 1, 2 HAVING count(*) > 1",
    )
    assert twice == [], f"orders paid more than once: {twice[:5]}"
    backwards = rows(
        dsn,
        "SELECT order_id::text, subject, from_status, to_status FROM order_transitions"
        " WHERE from_status IN ('paid', 'succeeded') AND order_id = ANY(%s::uuid[])",
        list(paid),
    )
    assert backwards == [], f"money moved back after success: {backwards[:5]}"


def _assert_one_sale_per_line(dsn: str, paid: set[str]) -> Counter[str]:
    sales = rows(dsn, "SELECT reference, sku, -quantity FROM stock_movements WHERE type = 'sale'")
    repeated = [sale for sale, n in Counter((ref, sku) for ref, sku, _ in sales).items() if n > 1]
    assert repeated == [], f"a line sold more than once: {repeated[:5]}"
    lines = rows(
        dsn,
        "SELECT order_id::text, sku, quantity FROM order_lines WHERE order_id = ANY(%s::uuid[])",
        list(paid),
    )
    assert sorted(sales) == sorted(lines), f"sales {len(sales)} differ from paid lines {len(lines)}"
    sold: Counter[str] = Counter()
    for _, sku, quantity in lines:
        sold[sku] += quantity
    return sold


def _assert_stock(dsn: str, initial: dict[str, int], sold: Counter[str]) -> None:
    # One statement, one snapshot: the expire job may be releasing holds meanwhile.
    stock = {
        sku: (on_hand, reserved, held, active)
        for sku, on_hand, reserved, held, active in rows(
            dsn,
            "SELECT p.sku, p.on_hand, p.reserved,"
            " (SELECT coalesce(sum(l.quantity), 0)::int FROM order_lines l JOIN orders o ON o.id = l.order_id"
            "   WHERE l.sku = p.sku AND o.status = 'pending_payment'),"
            " (SELECT coalesce(sum(r.quantity), 0)::int FROM stock_reservations r"
            "   WHERE r.sku = p.sku AND r.status = 'active')"
            " FROM products p",
        )
    }
    for sku, start in initial.items():
        on_hand, reserved, held, active = stock[sku]
        assert on_hand == start - sold[sku], f"{sku}: on_hand {on_hand}, expected {start} - {sold[sku]}"
        assert reserved == held == active, (
            f"{sku}: reserved {reserved}, open orders hold {held}, active {active}"
        )


def _assert_ledger_chains(dsn: str) -> None:
    moves = rows(
        dsn,
        "SELECT sku, quantity, on_hand_before, on_hand_after FROM stock_movements ORDER BY sku, id",
    )
    on_hand = dict(rows(dsn, "SELECT sku, on_hand FROM products"))
    last: dict[str, int] = {}
    for sku, quantity, before, after in moves:
        assert before == last.get(sku, 0), f"{sku}: chain broken, {before} after {last.get(sku, 0)}"
        assert after == before + quantity, f"{sku}: {before} + {quantity} != {after}"
        last[sku] = after
    for sku, units in on_hand.items():
        assert last.get(sku, 0) == units, f"{sku}: ledger ends at {last.get(sku, 0)}, on_hand {units}"


def _assert_every_event_judged(dsn: str) -> None:
    bad = rows(
        dsn,
        "SELECT event_key, status, last_error FROM provider_events"
        " WHERE status NOT IN ('processed', 'ignored')",
    )
    assert bad == [], f"events not applied: {bad[:5]}"


def _assert_each_slot_fired_once(dsn: str) -> None:
    twice = rows(
        dsn,
        "SELECT job, slot, count(*) FROM scheduled_runs WHERE trigger = 'scheduled'"
        " GROUP BY job, slot HAVING count(*) > 1",
    )
    assert twice == [], f"slots fired twice: {twice[:5]}"


def dead_letters(broker_url: str) -> dict[str, int]:
    broker = build_broker(load_settings({"BROKER_URL": broker_url}))
    try:
        return {queue: broker.get_queue_message_counts(queue)[2] for queue in QUEUES}
    finally:
        broker.close()


def wait_settled(dsn: str, paid: set[str], timeout: float) -> float:
    started = time.monotonic()
    while not settled(dsn, paid):
        if time.monotonic() - started > timeout:
            stuck = rows(
                dsn,
                "SELECT status, count(*), max(attempts), max(last_error)"
                " FROM provider_events GROUP BY status",
            )
            raise AssertionError(f"not settled within {timeout:.0f} s: events {stuck}")
        time.sleep(0.1)
    return time.monotonic() - started
