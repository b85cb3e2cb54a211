"""The stock ledger, low stock and reservation stats through the real app,
PostgreSQL, RabbitMQ and Dramatiq worker threads (promise 4; issue 3, items
4 to 6).

The property test runs random sequences of restocks, adjustments, checkouts,
payments, cancellations, returns and completions, and after every step holds
the shop to its ledger: the movements of a SKU add up to its on_hand, each
movement's after is its before plus its quantity, and 0 <= reserved <= on_hand.
A small model of the shop predicts every answer and every stock level."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from falcon import testing
from hypothesis import HealthCheck, event, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import text

from tests.conftest import TABLES, scalar
from tests.support.shop import ADMIN, call, checkout, intent_event, place, product, settle

# --------------------------------------------------------------------------- drivers


def set_stock(client: testing.TestClient, sku: str, on_hand: int, threshold: int = 0) -> testing.Result:
    body = {"name": f"Product {sku}", "price": 1000, "currency": "EUR", "on_hand": on_hand}
    body["low_stock_threshold"] = threshold
    return call(client, "PUT", f"/admin/products/{sku}", json=body, headers=ADMIN)


def pay(client: testing.TestClient, sessions, intent_id: str) -> None:
    settle(client, sessions, intent_event("payment_intent.succeeded", intent_id))


def cancel(client: testing.TestClient, sessions, intent_id: str) -> None:
    settle(client, sessions, intent_event("payment_intent.canceled", intent_id))


def order_action(client: testing.TestClient, order_id: str, action: str, **kwargs: Any) -> testing.Result:
    return call(client, "POST", f"/admin/orders/{order_id}/{action}", headers=ADMIN, **kwargs)


def order_status(client: testing.TestClient, order_id: str) -> str:
    return str(call(client, "GET", f"/admin/orders/{order_id}", headers=ADMIN).json["status"])


def stock_of(sessions, sku: str) -> tuple[int, int]:
    with sessions() as session:
        on_hand, reserved = session.execute(
            text("SELECT on_hand, reserved FROM products WHERE sku = :sku"), {"sku": sku}
        ).one()
    return int(on_hand), int(reserved)


def ledger(sessions, sku: str) -> list[tuple[int, str, int, int, int, str | None]]:
    """(id, type, quantity, before, after, reference), oldest first."""
    with sessions() as session:
        rows = session.execute(
            text(
                "SELECT id, type, quantity, on_hand_before, on_hand_after, reference "
                "FROM stock_movements WHERE sku = :sku ORDER BY id"
            ),
            {"sku": sku},
        ).all()
    return [tuple(row) for row in rows]


def assert_ledger_holds(sessions, skus: tuple[str, ...]) -> None:
    """Promise 4, for every SKU, read straight from the tables."""
    for sku in skus:
        on_hand, reserved = stock_of(sessions, sku)
        moves = ledger(sessions, sku)
        assert sum(m[2] for m in moves) == on_hand, (sku, on_hand, moves)
        assert 0 <= reserved <= on_hand, (sku, on_hand, reserved)
        for _, kind, quantity, before, after, _ in moves:
            assert after == before + quantity, (sku, moves)
            assert after >= 0, (sku, moves)
            assert (quantity > 0) == (kind in ("restock", "return")), (sku, moves)
        chain = [(m[3], m[4]) for m in moves]
        assert [before for before, _ in chain] == [0] + [after for _, after in chain[:-1]], (sku, moves)
        held = scalar(
            sessions,
            "SELECT coalesce(sum(quantity), 0) FROM stock_reservations WHERE sku = :s AND status = 'active'",
            s=sku,
        )
        assert held == reserved, (sku, reserved, held)


# --------------------------------------------------------------------------- the property test

SKUS = ("LG-A", "LG-B", "LG-C")
START = 6


@dataclass(frozen=True)
class Op:
    kind: str
    sku: str
    quantity: int
    pick: int
    second_sku: str
    second_quantity: int

    def __repr__(self) -> str:
        extra = f" +{self.second_sku}x{self.second_quantity}" if self.second_quantity else ""
        return f"Op({self.kind} {self.sku}x{self.quantity}{extra} pick={self.pick})"


OPS = st.builds(
    Op,
    # Weighted toward what creates orders and moves stock, so that most
    # sequences pay, cancel and return something; checkout first, as the
    # "simplest" value Hypothesis starts from.
    kind=st.sampled_from(
        [
            *("checkout", "pay", "return", "checkout", "cancel", "pay", "checkout", "return"),
            *("complete", "adjust", "restock"),
        ]
    ),
    sku=st.sampled_from(SKUS),
    quantity=st.integers(1, 4),
    pick=st.integers(0, 30),
    second_sku=st.sampled_from(SKUS),
    second_quantity=st.integers(0, 3),
)


@dataclass
class ModelOrder:
    id: str
    intent: str
    lines: dict[str, int]
    status: str = "pending_payment"
    payment: str = "pending"
    held: bool = True
    returned: dict[str, int] = field(default_factory=dict)


@dataclass
class Shop:
    """What the shop should hold after each step."""

    on_hand: dict[str, int]
    reserved: dict[str, int]
    orders: list[ModelOrder] = field(default_factory=list)

    def available(self, sku: str) -> int:
        return self.on_hand[sku] - self.reserved[sku]

    def pick(self, index: int, statuses: tuple[str, ...] | None = None) -> ModelOrder | None:
        """One of the orders (in `statuses`, when given), chosen by `index`."""
        among = [o for o in self.orders if statuses is None or o.status in statuses]
        return among[index % len(among)] if among else None


def run_step(client, sessions, shop: Shop, op: Op) -> None:
    steps = {
        "restock": step_restock,
        "adjust": step_adjust,
        "checkout": step_checkout,
        "pay": step_pay,
        "cancel": step_cancel,
        "return": step_return,
        "complete": step_complete,
    }
    steps[op.kind](client, sessions, shop, op)


def step_restock(client, sessions, shop: Shop, op: Op) -> None:
    target = shop.on_hand[op.sku] + op.quantity
    answer = set_stock(client, op.sku, target)
    assert answer.status_code == 200, answer.text
    shop.on_hand[op.sku] = target


def step_adjust(client, sessions, shop: Shop, op: Op) -> None:
    target = max(shop.on_hand[op.sku] - op.quantity, 0)
    answer = set_stock(client, op.sku, target)
    if target < shop.reserved[op.sku]:
        assert answer.status_code == 409, answer.text  # never below what is held
        event("adjustment refused: below reserved")
        return
    assert answer.status_code == 200, answer.text
    shop.on_hand[op.sku] = target


def step_checkout(client, sessions, shop: Shop, op: Op) -> None:
    lines = {op.sku: op.quantity}
    if op.second_quantity:
        lines[op.second_sku] = lines.get(op.second_sku, 0) + op.second_quantity
    answer = checkout(client, *lines.items())
    if any(shop.available(sku) < quantity for sku, quantity in lines.items()):
        assert answer.status_code == 409, answer.text
        assert answer.json["error"] == "insufficient_stock"
        event("checkout refused: short")
        return
    assert answer.status_code == 201, answer.text
    for sku, quantity in lines.items():
        shop.reserved[sku] += quantity
    intent = answer.json["payment"]["provider_payment_id"]
    shop.orders.append(ModelOrder(answer.json["order_id"], intent, lines))


def step_pay(client, sessions, shop: Shop, op: Op) -> None:
    order = shop.pick(op.pick)
    if order is None:
        return
    pay(client, sessions, order.intent)
    if order.payment not in ("pending", "canceled"):
        return  # succeeded already: a replay changes nothing
    order.payment = "succeeded"
    if order.held:  # the reserved units become a sale
        for sku, quantity in order.lines.items():
            shop.on_hand[sku] -= quantity
            shop.reserved[sku] -= quantity
        order.held, order.status = False, "paid"
        event("paid: reserved units sold")
    elif all(shop.available(sku) >= quantity for sku, quantity in order.lines.items()):
        for sku, quantity in order.lines.items():  # paid after cancel: taken again
            shop.on_hand[sku] -= quantity
        order.status = "paid"
        event("paid after cancel: units taken again")
    else:
        order.status = "needs_attention"
        event("paid after cancel: needs attention")


def step_cancel(client, sessions, shop: Shop, op: Op) -> None:
    order = shop.pick(op.pick)
    if order is None:
        return
    cancel(client, sessions, order.intent)
    if order.payment != "pending":
        return  # a succeeded payment is never canceled
    order.payment, order.status, order.held = "canceled", "canceled", False
    for sku, quantity in order.lines.items():
        shop.reserved[sku] -= quantity


# Returns and completions are aimed at orders that can take them (paid or
# completed); refusals by order status are test_order_lifecycle's business.
SOLD = ("paid", "completed")


def step_return(client, sessions, shop: Shop, op: Op) -> None:
    order = shop.pick(op.pick, SOLD)
    if order is None:
        return
    body = {"lines": [{"sku": op.sku, "quantity": op.quantity}]}
    answer = order_action(client, order.id, "return", json=body)
    if op.sku not in order.lines:
        assert answer.status_code == 400, answer.text
    elif order.returned.get(op.sku, 0) + op.quantity > order.lines[op.sku]:
        assert answer.status_code == 409, answer.text
    else:
        assert answer.status_code == 200, answer.text
        order.returned[op.sku] = order.returned.get(op.sku, 0) + op.quantity
        shop.on_hand[op.sku] += op.quantity
        event("returned")


def step_complete(client, sessions, shop: Shop, op: Op) -> None:
    order = shop.pick(op.pick, SOLD)
    if order is None:
        return
    answer = order_action(client, order.id, "complete")
    assert answer.status_code == 200, answer.text
    order.status = "completed"


def assert_shop_matches(client, sessions, shop: Shop) -> None:
    for sku in SKUS:
        assert stock_of(sessions, sku) == (shop.on_hand[sku], shop.reserved[sku]), sku
        shown = product(client, sku)
        assert (shown["on_hand"], shown["reserved"], shown["available"]) == (
            shop.on_hand[sku],
            shop.reserved[sku],
            shop.available(sku),
        )
    for order in shop.orders:
        assert order_status(client, order.id) == order.status, order


def op(
    kind: str, sku: str = "LG-A", quantity: int = 1, pick: int = 0, second: tuple[str, int] = ("LG-A", 0)
) -> Op:
    return Op(kind, sku, quantity, pick, *second)


# Two sequences that always run: a success after a cancel takes the units
# again when they are there, and needs attention when they are not; with
# returns, completions and a refused adjustment around them.
SOLD_AFTER_CANCEL = [
    op("checkout", "LG-A", 2, second=("LG-B", 1)),
    op("cancel", pick=0),
    op("pay", pick=0),
    op("return", "LG-A", 1, pick=0),
    op("complete", pick=0),
    op("return", "LG-A", 2, pick=0),
    op("return", "LG-B", 1, pick=0),
    op("return", "LG-C", 1, pick=0),
    op("adjust", "LG-A", 4),
]
STOCK_GONE_AFTER_CANCEL = [
    op("checkout", "LG-C", 4),
    op("cancel", pick=0),
    op("checkout", "LG-C", 4),
    op("adjust", "LG-C", 4),
    op("pay", pick=0),
    op("pay", pick=1),
    op("restock", "LG-C", 3),
    op("pay", pick=0),
    op("return", "LG-C", 4, pick=0),
]


def truncate(sessions) -> None:
    """Hypothesis runs many examples inside one test: start each from empty tables."""
    with sessions() as session:
        session.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
        session.commit()


@hypothesis_settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, min_size=4, max_size=16))
@example(ops=SOLD_AFTER_CANCEL)
@example(ops=STOCK_GONE_AFTER_CANCEL)
def test_the_ledger_reproduces_on_hand_through_any_mix_of_operations(
    client, sessions, fake_stripe, worker, ops
):
    truncate(sessions)
    shop = Shop(on_hand=dict.fromkeys(SKUS, START), reserved=dict.fromkeys(SKUS, 0))
    for sku in SKUS:
        assert set_stock(client, sku, START).status_code == 201

    for op in ops:
        run_step(client, sessions, shop, op)
        assert_ledger_holds(sessions, SKUS)
        assert_shop_matches(client, sessions, shop)


# --------------------------------------------------------------------------- movements, newest first


def movements_page(client: testing.TestClient, sku: str, **params: Any) -> testing.Result:
    return call(client, "GET", f"/admin/products/{sku}/movements", params=params, headers=ADMIN)


@pytest.fixture
def busy_ledger(client, sessions, fake_stripe, worker) -> list[tuple[int, str, int, int, int, str | None]]:
    """Nine movements on BUSY (restocks, adjustments, a sale and a return),
    with OTHER's movements in between."""
    for on_hand in (5, 8, 3):
        assert set_stock(client, "BUSY", on_hand).status_code in (200, 201)
        assert set_stock(client, "OTHER", on_hand + 1).status_code in (200, 201)
    order_id, intent = place(client, ("BUSY", 2), ("OTHER", 1))
    pay(client, sessions, intent)
    assert (
        order_action(client, order_id, "return", json={"lines": [{"sku": "BUSY", "quantity": 1}]}).status_code
        == 200
    )
    for on_hand in (12, 4, 9, 10):
        assert set_stock(client, "BUSY", on_hand).status_code == 200
    moves = ledger(sessions, "BUSY")
    assert [m[1] for m in moves] == [
        "restock",
        "restock",
        "adjustment",
        "sale",
        "return",
        "restock",
        "adjustment",
        "restock",
        "restock",
    ]
    return moves


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 9, 10, 500])
def test_movements_are_newest_first_and_paginate_without_gaps_or_repeats(client, busy_ledger, limit):
    newest_first = [m[0] for m in reversed(busy_ledger)]
    pages: list[list[dict[str, Any]]] = []
    before: int | None = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            params["before"] = before
        answer = movements_page(client, "BUSY", **params)
        assert answer.status_code == 200, answer.text
        page = answer.json["movements"]
        assert 0 < len(page) <= limit
        pages.append(page)
        before = answer.json["next_before"]
        if before is None:
            break
        assert before == page[-1]["id"]
        assert len(pages) <= len(busy_ledger), "pagination does not end"

    seen = [m["id"] for page in pages for m in page]
    assert seen == newest_first
    assert all(len(page) == limit for page in pages[:-1])
    assert len(pages) == max(1, -(-len(busy_ledger) // limit))


def test_a_movement_shows_what_changed_and_why(client, busy_ledger):
    answer = movements_page(client, "BUSY", limit=500)
    assert answer.status_code == 200, answer.text
    shown = answer.json["movements"]
    assert [(m["id"], m["type"], m["quantity"], m["before"], m["after"], m["reference"]) for m in shown] == [
        tuple(row) for row in reversed(busy_ledger)
    ]
    assert all(m["sku"] == "BUSY" and m["at"] and m["reason"] for m in shown)
    sale = next(m for m in shown if m["type"] == "sale")
    returned = next(m for m in shown if m["type"] == "return")
    assert (sale["quantity"], sale["before"], sale["after"]) == (-2, 3, 1)
    assert (returned["quantity"], returned["before"], returned["after"]) == (1, 1, 2)
    assert sale["reference"] == returned["reference"]
    uuid.UUID(sale["reference"])
    assert sum(m["quantity"] for m in shown) == product(client, "BUSY")["on_hand"] == 10


def test_movements_of_a_sku_without_any_are_an_empty_page(client, fake_stripe):
    assert set_stock(client, "NOTHING", 0).status_code == 201
    answer = movements_page(client, "NOTHING")
    assert answer.status_code == 200, answer.text
    assert answer.json == {"movements": [], "next_before": None}


def test_movements_of_an_unknown_sku_are_404(client):
    answer = movements_page(client, "NO-SUCH-SKU")
    assert answer.status_code == 404, answer.text
    assert answer.json["error"] == "not_found"


@pytest.mark.parametrize(
    "params",
    [{"limit": "0"}, {"limit": "501"}, {"limit": "x"}, {"before": "0"}, {"before": "-3"}, {"before": "y"}],
    ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()),
)
def test_bad_movement_paging_is_400(client, fake_stripe, params):
    assert set_stock(client, "PAGED", 3).status_code == 201
    answer = movements_page(client, "PAGED", **params)
    assert answer.status_code == 400, answer.text
    assert answer.json["error"]


def test_movements_need_the_admin_token(client, fake_stripe):
    assert set_stock(client, "PAGED", 3).status_code == 201
    answer = call(client, "GET", "/admin/products/PAGED/movements")
    assert answer.status_code == 401, answer.text


# --------------------------------------------------------------------------- low stock


def listed(client: testing.TestClient, **params: Any) -> list[str]:
    answer = call(client, "GET", "/admin/products", params=params, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return [p["sku"] for p in answer.json["products"]]


def test_the_low_stock_list_is_exactly_the_skus_at_or_below_their_threshold(
    client, sessions, fake_stripe, worker
):
    shelf = {  # sku: (on_hand, threshold)
        "LS-ABOVE": (10, 3),
        "LS-JUST-ABOVE": (4, 3),
        "LS-AT": (3, 3),
        "LS-BELOW": (1, 3),
        "LS-HELD": (6, 3),
        "LS-ZERO": (0, 0),
        "LS-NO-THRESHOLD": (1, 0),
    }
    for sku, (on_hand, threshold) in shelf.items():
        assert set_stock(client, sku, on_hand, threshold).status_code == 201
    _, held_intent = place(client, ("LS-HELD", 3))  # available 3: low by reservation

    low = ["LS-AT", "LS-BELOW", "LS-HELD", "LS-ZERO"]
    high = ["LS-ABOVE", "LS-JUST-ABOVE", "LS-NO-THRESHOLD"]
    assert listed(client, low_stock="true") == low
    assert listed(client, low_stock="false") == high
    assert listed(client) == sorted(low + high)
    every = call(client, "GET", "/admin/products", headers=ADMIN).json["products"]
    assert {p["sku"] for p in every if p["low_stock"]} == set(low)
    assert all(p["available"] <= p["low_stock_threshold"] for p in every if p["low_stock"])

    settle(client, sessions, intent_event("payment_intent.canceled", held_intent))
    assert set_stock(client, "LS-ABOVE", 3, 3).status_code == 200

    assert listed(client, low_stock="true") == ["LS-ABOVE", "LS-AT", "LS-BELOW", "LS-ZERO"]


def test_the_low_stock_list_needs_the_admin_token(client):
    assert call(client, "GET", "/admin/products", params={"low_stock": "true"}).status_code == 401


def low_stock_logs(caplog: pytest.LogCaptureFixture, sku: str) -> int:
    """How many times "low stock" was logged for `sku`."""
    prefix = f"low stock: {sku} has "
    return sum(1 for r in caplog.records if r.name == "domain.stock" and r.getMessage().startswith(prefix))


def test_crossing_the_threshold_is_logged_once_per_crossing(client, sessions, fake_stripe, worker, caplog):
    caplog.set_level(logging.WARNING, logger="domain.stock")
    assert set_stock(client, "LOW", 10, threshold=3).status_code == 201
    assert set_stock(client, "CALM", 10, threshold=3).status_code == 201

    def sell(*lines: tuple[str, int]) -> None:
        pay(client, sessions, place(client, *lines)[1])

    sell(("LOW", 3))  # available 7
    sell(("LOW", 3))  # 4
    assert low_stock_logs(caplog, "LOW") == 0
    sell(("LOW", 1))  # 3: the crossing
    sell(("LOW", 2), ("CALM", 1))  # 1
    sell(("LOW", 1))  # 0
    assert low_stock_logs(caplog, "LOW") == 1
    assert product(client, "LOW")["low_stock"] is True

    assert set_stock(client, "LOW", 2, threshold=3).status_code == 200  # restocked, still low
    sell(("LOW", 1))
    assert low_stock_logs(caplog, "LOW") == 1

    assert set_stock(client, "LOW", 10, threshold=3).status_code == 200  # lifted above
    assert low_stock_logs(caplog, "LOW") == 1
    sell(("LOW", 6))  # 4
    assert low_stock_logs(caplog, "LOW") == 1
    sell(("LOW", 2))  # 2: crossed again
    sell(("LOW", 1))
    assert low_stock_logs(caplog, "LOW") == 2

    assert set_stock(client, "LOW", 9, threshold=3).status_code == 200  # available 8
    assert set_stock(client, "LOW", 3, threshold=3).status_code == 200  # an adjustment crosses too
    assert low_stock_logs(caplog, "LOW") == 3
    assert low_stock_logs(caplog, "CALM") == 0
    assert_ledger_holds(sessions, ("LOW", "CALM"))


def test_a_released_reservation_lifts_the_sku_and_the_next_crossing_is_logged(
    client, sessions, fake_stripe, worker, caplog
):
    caplog.set_level(logging.WARNING, logger="domain.stock")
    assert set_stock(client, "HOLD", 5, threshold=2).status_code == 201

    _, intent = place(client, ("HOLD", 3))  # available 2: crossed by a reservation
    assert low_stock_logs(caplog, "HOLD") == 1
    cancel(client, sessions, intent)  # available 5 again
    assert product(client, "HOLD")["low_stock"] is False
    place(client, ("HOLD", 4))  # available 1: a new crossing

    assert low_stock_logs(caplog, "HOLD") == 2


# --------------------------------------------------------------------------- reservation stats


def stats(client: testing.TestClient) -> dict[str, Any]:
    answer = call(client, "GET", "/admin/reservations/stats", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return dict(answer.json)


def test_reservation_stats_count_active_holds_units_per_sku_and_the_oldest_age(
    client, sessions, fake_stripe, worker
):
    assert stats(client) == {
        "active_reservations": 0,
        "units_reserved": {},
        "oldest_active_age_seconds": None,
    }
    for sku in ("RS-A", "RS-B", "RS-C"):
        assert set_stock(client, sku, 10).status_code == 201

    old_order, old_intent = place(client, ("RS-A", 2), ("RS-B", 1))
    _, new_intent = place(client, ("RS-A", 3))
    _, paid_intent = place(client, ("RS-C", 4))
    pay(client, sessions, paid_intent)  # consumed: no longer held
    with sessions() as session:
        session.execute(
            text(
                "UPDATE stock_reservations SET created_at = now() - interval '600 seconds' "
                "WHERE order_id = :o"
            ),
            {"o": old_order},
        )
        session.commit()

    started = time.monotonic()
    shown = stats(client)
    assert shown["active_reservations"] == 3
    assert shown["units_reserved"] == {"RS-A": 5, "RS-B": 1}
    assert 600 <= shown["oldest_active_age_seconds"] <= 600 + 30 + (time.monotonic() - started)

    cancel(client, sessions, old_intent)
    shown = stats(client)
    assert (shown["active_reservations"], shown["units_reserved"]) == (1, {"RS-A": 3})
    assert 0 <= shown["oldest_active_age_seconds"] < 60

    pay(client, sessions, new_intent)
    assert stats(client) == {
        "active_reservations": 0,
        "units_reserved": {},
        "oldest_active_age_seconds": None,
    }


def test_reservation_stats_need_the_admin_token(client):
    assert call(client, "GET", "/admin/reservations/stats").status_code == 401
