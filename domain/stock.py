"""Stock: reservations, sales and the ledger.

`0 <= reserved <= on_hand` is a CHECK in the database; every change here is a
single conditional UPDATE, so two racing transactions can never both take the
last unit, and a replayed change finds its precondition gone and does nothing.
Every change of `on_hand` writes a movement in the same transaction.

These run once or more per order and per event, so they are Core statements
on the session's connection: the ORM's bulk-update bookkeeping (and the
autoflush before each statement) cost more than the statements themselves.
A product's low-stock mark is kept by the same UPDATE that moves its units.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Integer,
    Row,
    String,
    Table,
    Update,
    bindparam,
    case,
    column,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from domain.bulk import BulkInsert, Write, any_of
from domain.errors import InsufficientStock, UnknownSku
from domain.models import Order, Product, StockMovement, StockReservation

log = logging.getLogger(__name__)

Line = tuple[str, int]  # (sku, quantity)

# Orders whose payment went through; their stock is theirs.
PAID_ORDER_STATUSES = ("paid", "ready_for_pickup", "completed", "refunded")


def reserve(session: Session, order_id: uuid.UUID, lines: Iterable[Line]) -> None:
    """Hold units for an order, or raise InsufficientStock holding none
    (the caller's transaction rolls back)."""
    # Sorted, so two orders reserving the same SKUs lock them in one order.
    wanted = sorted(lines)
    for sku, quantity in wanted:
        if _change(session, sku, reserved=quantity, guarded=True) is None:
            raise InsufficientStock(sku, available(session, sku))
    held = [
        {"order_id": order_id, "sku": sku, "quantity": quantity, "status": "active"}
        for sku, quantity in wanted
    ]
    session.connection().execute(_HOLD, held)


def available(session: Session, sku: str) -> int:
    row = session.execute(select(Product.on_hand - Product.reserved).where(Product.sku == sku)).first()
    if row is None:
        raise UnknownSku(f"unknown SKU {sku!r}", sku=sku)
    return int(row[0])


def _close_reservations(
    session: Session, order_ids: Sequence[uuid.UUID], status: str
) -> dict[uuid.UUID, list[Line]]:
    """Move the orders' active reservations to `status`, once, in one
    statement: a second call finds none active and returns nothing. Returns
    each order's closed lines, sorted."""
    if not order_ids:
        return {}
    params = {"order_ids": list(order_ids), "new_status": status}
    closed: dict[uuid.UUID, list[Line]] = {}
    for order_id, sku, quantity in session.connection().execute(_CLOSE_RESERVATIONS, params):
        closed.setdefault(order_id, []).append((sku, quantity))
    return {order_id: sorted(lines) for order_id, lines in closed.items()}


def release(session: Session, order_id: uuid.UUID) -> list[Line]:
    """Give the order's reserved units back to the shelf."""
    return release_many(session, [order_id]).get(order_id, [])


def release_many(session: Session, order_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[Line]]:
    """Give several orders' reserved units back to the shelf in one go: their
    reservations close first, then the product rows are locked in SKU order
    across all of them and changed by one UPDATE. Released order by order,
    a transaction would lock one order's SKUs, then the next order's (C,
    then A), while a checkout locks A then C: a deadlock. Returns each
    order's released lines, sorted."""
    released = _close_reservations(session, order_ids, "released")
    totals: Counter[str] = Counter()
    for lines in released.values():
        for sku, quantity in lines:
            totals[sku] += quantity
    _give_back(session, totals)
    return released


def _give_back(session: Session, units: Counter[str]) -> None:
    """Reserved units back to the shelf, each product row locked in SKU order."""
    skus = sorted(sku for sku, quantity in units.items() if quantity)
    if not skus:
        return
    if len(skus) == 1:
        _change(session, skus[0], reserved=-units[skus[0]])
        return
    params = {"skus": skus, "on_hand": [0] * len(skus), "reserved": [-units[sku] for sku in skus]}
    for row in session.connection().execute(_CHANGE_MANY_UNITS, params):
        _warn_low(row)


def sell_reserved(session: Session, sold: Iterable[tuple[str, str, int]]) -> list[Write]:
    """Consumed reservations, as (reference, sku, quantity), become sales:
    on_hand and reserved both drop now, one statement locking the product
    rows in SKU order. Returns the `sale` movements (one per line, with its
    own before and after) as a write for the caller to send with its others
    (write_together). The product rows are the hottest rows there are (a
    popular SKU): callers do this last in their transaction, with at most
    that one write and the commit after it."""
    by_sku: dict[str, list[tuple[str, int]]] = {}
    for reference, sku, quantity in sold:
        by_sku.setdefault(sku, []).append((reference, quantity))
    if not by_sku:
        return []
    skus = sorted(by_sku)
    totals = [-sum(quantity for _, quantity in by_sku[sku]) for sku in skus]
    changed = session.connection().execute(
        _CHANGE_MANY_UNITS, {"skus": skus, "on_hand": totals, "reserved": totals}
    )
    delta = dict(zip(skus, totals, strict=True))
    movements = []
    for row in sorted(changed, key=lambda row: str(row.sku)):
        _warn_low(row)
        sku, on_hand = row.sku, int(row.on_hand) - delta[row.sku]
        for reference, quantity in by_sku[sku]:
            movements.append(_movement(sku, "sale", -quantity, on_hand, reference, "order paid"))
            on_hand -= quantity
    return [_RECORD_MOVEMENTS.write(movements)]


def sell_unreserved(session: Session, lines: Iterable[Line], reference: str) -> bool:
    """Sell units straight from what is available (a payment that succeeded
    after its reservation was released). All lines or none: returns False and
    changes nothing when any line is short."""
    wanted = sorted(lines)
    locked = session.execute(
        select(Product.sku, Product.on_hand - Product.reserved)
        .where(Product.sku.in_([sku for sku, _ in wanted]))
        .order_by(Product.sku)
        .with_for_update()
    ).all()
    free = {sku: int(units) for sku, units in locked}
    if any(free.get(sku, 0) < quantity for sku, quantity in wanted):
        return False
    for sku, quantity in wanted:
        after = _on_hand(_change(session, sku, on_hand=-quantity))
        _record(session, sku, "sale", -quantity, after + quantity, reference, "paid after expiry")
    return True


_PRODUCTS = cast(Table, Product.__table__)
_RESERVATIONS = cast(Table, StockReservation.__table__)
_MOVEMENTS = cast(Table, StockMovement.__table__)
_AVAILABLE = _PRODUCTS.c.on_hand - _PRODUCTS.c.reserved


def _units_update(on_hand: ColumnElement[int], reserved: ColumnElement[int]) -> Update:
    """One UPDATE of a product's units and of its low-stock mark, built once
    (its parameters are bound per call). SET expressions read the row as it
    was, so the mark compares the new available units with the threshold:
    set on the way down (an earlier mark is kept), cleared on the way up. A
    mark that reads as this transaction's `now()` was set by it: a crossing
    is logged once, however many sales follow and whatever races."""
    low = (_PRODUCTS.c.on_hand + on_hand) - (
        _PRODUCTS.c.reserved + reserved
    ) <= _PRODUCTS.c.low_stock_threshold
    return (
        update(_PRODUCTS)
        .values(
            on_hand=_PRODUCTS.c.on_hand + on_hand,
            reserved=_PRODUCTS.c.reserved + reserved,
            low_stock_since=case((low, func.coalesce(_PRODUCTS.c.low_stock_since, func.now())), else_=None),
            updated_at=func.now(),
        )
        .returning(
            _PRODUCTS.c.on_hand,
            _AVAILABLE.label("available"),
            _PRODUCTS.c.low_stock_threshold,
            (_PRODUCTS.c.low_stock_since == func.now()).label("crossed"),
            _PRODUCTS.c.sku,
        )
    )


_CHANGE_UNITS = _units_update(
    bindparam("on_hand_delta", type_=Integer), bindparam("reserved_delta", type_=Integer)
).where(_PRODUCTS.c.sku == bindparam("product_sku"))
# The deltas of many SKUs' units as arrays, unnested (see bulk).
_DELTAS = (
    func.unnest(
        bindparam("skus", type_=ARRAY(String)),
        bindparam("on_hand", type_=ARRAY(Integer)),
        bindparam("reserved", type_=ARRAY(Integer)),
    )
    .table_valued(column("sku", String), column("on_hand", Integer), column("reserved", Integer))
    .render_derived(name="deltas")
)
# Many SKUs' units, locked in SKU order in the same statement: the CTE locks
# rows as it yields them, sorted, and the UPDATE changes only rows it has
# yielded, so whatever order the plan visits them in, every row lock is taken
# in SKU order (two such changes never deadlock) and no second round trip is
# spent on a separate SELECT … FOR UPDATE. MATERIALIZED: the lock stays a
# step of its own, never folded into the UPDATE's join.
_LOCKED_PRODUCTS = (
    select(_PRODUCTS.c.sku)
    .where(any_of(_PRODUCTS.c.sku, "skus"))
    .order_by(_PRODUCTS.c.sku)
    .with_for_update()
    .cte("locked")
    .prefix_with("MATERIALIZED")
)
_CHANGE_MANY_UNITS = _units_update(_DELTAS.c.on_hand, _DELTAS.c.reserved).where(
    _PRODUCTS.c.sku == _DELTAS.c.sku, _PRODUCTS.c.sku == _LOCKED_PRODUCTS.c.sku
)
_CLOSE_RESERVATIONS = (
    update(_RESERVATIONS)
    .where(
        any_of(_RESERVATIONS.c.order_id, "order_ids"),
        _RESERVATIONS.c.status == "active",
    )
    .values(status=bindparam("new_status"), closed_at=func.now())
    .returning(_RESERVATIONS.c.order_id, _RESERVATIONS.c.sku, _RESERVATIONS.c.quantity)
)
_RECORD_MOVEMENT = insert(_MOVEMENTS)
_RECORD_MOVEMENTS = BulkInsert(
    _MOVEMENTS, ("sku", "type", "quantity", "on_hand_before", "on_hand_after", "reference", "reason")
)
_HOLD = insert(_RESERVATIONS)
# Reserving takes units only while enough are available: the guard and the
# change are one statement, so two racing checkouts cannot both take the last.
_RESERVE_UNITS = _CHANGE_UNITS.where(bindparam("reserved_delta", type_=Integer) <= _AVAILABLE)


def _change(
    session: Session, sku: str, *, on_hand: int = 0, reserved: int = 0, guarded: bool = False
) -> Row[Any] | None:
    """Move a product's units; None when `guarded` and too few are available."""
    statement = _RESERVE_UNITS if guarded else _CHANGE_UNITS
    params = {"product_sku": sku, "on_hand_delta": on_hand, "reserved_delta": reserved}
    row = session.connection().execute(statement, params).first()
    if row is not None:
        _warn_low(row)
    return row


def _warn_low(row: Row[Any]) -> None:
    if row.crossed:
        log.warning(
            "low stock: %s has %s available (threshold %s)", row.sku, row.available, row.low_stock_threshold
        )


def _on_hand(row: Row[Any] | None) -> int:
    assert row is not None, "the product row exists: its reservation or order line names it"
    return int(row[0])


def set_on_hand(session: Session, sku: str, on_hand: int, reason: str) -> None:
    """Set a SKU's on_hand (the product row must be locked by the caller),
    writing a `restock` for an increase and an `adjustment` for a decrease.
    The caller re-checks the low-stock mark (track_low_stock)."""
    product = session.get_one(Product, sku)
    before = product.on_hand
    if on_hand == before:
        return
    product.on_hand = on_hand
    session.flush()  # the CHECK refuses on_hand below reserved here, before any movement
    kind = "restock" if on_hand > before else "adjustment"
    _record(session, sku, kind, on_hand - before, before, None, reason)


def put_back(session: Session, sku: str, quantity: int, reference: str, reason: str) -> None:
    """Goods come back (a return): on_hand rises, with a `return` movement."""
    after = _on_hand(_change(session, sku, on_hand=quantity))
    _record(session, sku, "return", quantity, after - quantity, reference, reason)


def track_low_stock(session: Session, sku: str) -> None:
    """Re-check a SKU's low-stock mark after an operator changed its units or
    its threshold: the same UPDATE as every unit change, moving no units."""
    session.flush()  # the ORM's pending change of on_hand or threshold is what it must see
    _change(session, sku)


def _record(
    session: Session, sku: str, kind: str, quantity: int, before: int, reference: str | None, reason: str
) -> None:
    session.connection().execute(_RECORD_MOVEMENT, _movement(sku, kind, quantity, before, reference, reason))


def _movement(
    sku: str, kind: str, quantity: int, before: int, reference: str | None, reason: str
) -> dict[str, Any]:
    return {
        "sku": sku,
        "type": kind,
        "quantity": quantity,
        "on_hand_before": before,
        "on_hand_after": before + quantity,
        "reference": reference,
        "reason": reason,
    }


def units_by_type(session: Session, reference: str, kind: str) -> dict[str, int]:
    """Units moved per SKU by movements of one type for one reference (an
    order id), as positive numbers: how much an order sold, or got back."""
    rows = session.execute(
        select(StockMovement.sku, func.sum(StockMovement.quantity))
        .where(StockMovement.reference == reference, StockMovement.type == kind)
        .group_by(StockMovement.sku)
    ).all()
    return {sku: abs(int(total)) for sku, total in rows}


def release_expired_reservations(
    session: Session, now: datetime, ttl: timedelta, *, after: uuid.UUID | None = None, limit: int = 100
) -> tuple[Counter[str], uuid.UUID | None]:
    """Active reservations older than `ttl` whose order is not paid go back
    to the shelf, under their orders' row locks. The order itself stays as
    it is (expiring it is the expire job's work)."""
    old = select(StockReservation.order_id).where(
        StockReservation.status == "active", StockReservation.created_at < now - ttl
    )
    query = (
        select(Order)
        .where(Order.id.in_(old), Order.status.not_in(PAID_ORDER_STATUSES))
        .order_by(Order.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if after is not None:
        query = query.where(Order.id > after)
    orders = list(session.scalars(query))
    # All the batch's orders at once, so its product rows are locked in one
    # SKU order (see release_many), never order by order.
    released = release_many(session, [order.id for order in orders])
    units = sum(quantity for lines in released.values() for _, quantity in lines)
    counts = Counter({"orders_released": len(released), "units_released": units})
    return +counts, orders[-1].id if len(orders) == limit else None
