"""Orders: placing one, and what a payment outcome makes of it.

Services here take a session and never commit: the adapter that opened the
unit of work commits it, so a rule's effects and its marks land together.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, cast

from sqlalchemy import Table, bindparam, select, text
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from domain import carts, payments, stock
from domain.bulk import BulkInsert, Write, write_together
from domain.errors import Conflict, InvalidRequest, NotFound, UnknownSku
from domain.models import Order, OrderLine, OrderTransition, Payment, Product


@dataclass(frozen=True)
class PlaceOrder:
    """Either `lines` or a `cart_id` whose lines are taken (and the cart
    consumed) in the order's own transaction."""

    lines: tuple[stock.Line, ...]
    provider: str
    currency: str
    customer_email: str | None = None
    customer_phone: str | None = None
    cart_id: str | None = None


def place_order(
    session: Session,
    command: PlaceOrder,
    payment_window: timedelta,
    choose_provider: Callable[[int], str] | None = None,
) -> tuple[Order, Payment]:
    """Create the order, its lines, its payment and hold its stock.
    `choose_provider`, given the total, names the payment's provider (payment
    routing); raising there leaves nothing behind."""
    order_id = uuid.uuid4()
    if command.cart_id is not None:
        command = replace(command, lines=carts.lines_for_checkout(session, command.cart_id))
    skus = [sku for sku, _ in command.lines]
    products = {p.sku: p for p in session.scalars(select(Product).where(Product.sku.in_(skus)))}
    for sku in skus:
        if sku not in products:
            raise UnknownSku(f"unknown SKU {sku!r}", sku=sku)
        if products[sku].currency != command.currency:
            raise InvalidRequest(
                f"{sku} is priced in {products[sku].currency}, not {command.currency}", sku=sku
            )
    total = sum(products[sku].price * quantity for sku, quantity in command.lines)
    provider = command.provider if choose_provider is None else choose_provider(total)
    order = Order(
        id=order_id,
        status="pending_payment",
        currency=command.currency,
        total_amount=total,
        customer_email=command.customer_email,
        customer_phone=command.customer_phone,
        expires_at=datetime.now(UTC) + payment_window,
    )
    session.add(order)
    session.flush()
    for sku, quantity in command.lines:
        order.lines.append(OrderLine(sku=sku, quantity=quantity, unit_price=products[sku].price))
    stock.reserve(session, order.id, command.lines)
    payment = Payment(
        id=uuid.uuid4(),
        order_id=order.id,
        provider=provider,
        status="pending",
        amount=total,
        currency=command.currency,
    )
    session.add(payment)
    log_transition(session, order.id, "order", None, "pending_payment", "checkout")
    if command.cart_id is not None:
        carts.check_out(session, command.cart_id, order.id)
    session.flush()
    return order, payment


def attach_provider_payment(session: Session, payment_id: uuid.UUID, provider_payment_id: str) -> None:
    payment = session.get_one(Payment, payment_id, with_for_update=True)
    payment.provider_payment_id = provider_payment_id


def abandon_checkout(session: Session, order_id: uuid.UUID, reason: str) -> None:
    """The provider could not start the payment: give the stock back and
    close the order, so nothing stays reserved for a payment that never was."""
    # Payment before order: the same lock order as the event path.
    payment = _payment_of(session, order_id)
    order = session.get_one(Order, order_id, with_for_update=True)
    carts.release_from(session, order_id)
    _move_payment(session, order, payment, "failed", reason, None)
    _move_order(session, order, "failed", reason, None)
    # Products last, so a popular SKU's row is held only until the commit.
    stock.release(session, order_id)


class PaymentState(Protocol):
    """A locked payment as the payment path needs it: an ORM Payment, or a
    row the event path read with Core."""

    @property
    def id(self) -> uuid.UUID: ...

    @property
    def order_id(self) -> uuid.UUID: ...

    @property
    def status(self) -> str: ...


@dataclass(frozen=True)
class PaymentChange:
    """A locked payment and the status something (an event, a job) asks of it.
    `final_failure` marks a failure the customer cannot retry on the same
    payment: its stock is released."""

    payment: PaymentState
    target: str
    reason: str
    event_id: int | None = None
    final_failure: bool = False


# The payment path runs once per provider event: Core statements built once,
# on the session's connection, each run once for all the payments a
# transaction moves (the ORM's loading and flush bookkeeping cost more than
# the SQL, and a round trip costs more than a row).
_ORDERS = cast(Table, Order.__table__)
_PAYMENTS = cast(Table, Payment.__table__)
_TRANSITIONS = cast(Table, OrderTransition.__table__)
_LINES = cast(Table, OrderLine.__table__)
# The orders locked sorted by id (two transactions moving overlapping orders
# lock them in one order) and, of those a success pays while they still
# await payment, the active reservations consumed (their units leave the
# shelf with stock.sell_reserved): one statement for what took two. The
# reservations' UPDATE reads the aggregate of every locked order, so no
# reservation is touched before every order is locked, the order the two
# statements kept. The rows are the orders' statuses (sku NULL), then the
# consumed lines.
_LOCK_ORDERS_CONSUMING = text("""WITH locked_orders AS MATERIALIZED (
    SELECT id, status FROM orders WHERE id = ANY(CAST(:order_ids AS uuid[])) ORDER BY id FOR UPDATE
), paying AS (
    SELECT array_agg(id) AS ids FROM locked_orders
    WHERE id = ANY(CAST(:succeeding AS uuid[])) AND status = ANY(CAST(:awaiting AS text[]))
), consumed AS (
    UPDATE stock_reservations SET status = 'consumed', closed_at = now() FROM paying
    WHERE stock_reservations.order_id = ANY(paying.ids) AND stock_reservations.status = 'active'
    RETURNING stock_reservations.order_id, stock_reservations.sku, stock_reservations.quantity
)
SELECT id AS order_id, status, NULL::text AS sku, NULL::integer AS quantity FROM locked_orders
UNION ALL SELECT order_id, NULL, sku, quantity FROM consumed""")


class _SetStatuses:
    """One UPDATE for every row of a kind, the new statuses passed as arrays
    (an executemany costs a statement's work per row, client and server)."""

    def __init__(self, table: str) -> None:
        self._ids, self._statuses = f"{table}_ids", f"{table}_statuses"
        self._sql = (
            f"UPDATE {table} SET status = moved.status, updated_at = now()"
            f" FROM unnest(CAST(:{self._ids} AS uuid[]), CAST(:{self._statuses} AS text[]))"
            f" AS moved (id, status) WHERE {table}.id = moved.id"
        )

    def write(self, moves: dict[uuid.UUID, str]) -> Write:
        return Write(self._sql, {self._ids: list(moves), self._statuses: list(moves.values())})


_SET_PAYMENTS = _SetStatuses("payments")
_SET_ORDERS = _SetStatuses("orders")
_LOG_TRANSITIONS = BulkInsert(
    _TRANSITIONS, ("order_id", "subject", "from_status", "to_status", "reason", "event_id")
)
_ORDER_LINES = select(_LINES.c.sku, _LINES.c.quantity).where(_LINES.c.order_id == bindparam("order_id"))


@dataclass
class _Moves:
    """The transitions one payment change makes, written together at the end."""

    order_id: uuid.UUID
    order_status: str
    event_id: int | None
    # The order's reservations, consumed up front for every order a
    # success finds pending (one statement for all of them).
    consumed: list[stock.Line]
    transitions: list[dict[str, Any]] = field(default_factory=list)
    # Consumed reservations whose units leave the shelf last (hot rows).
    sold: list[stock.Line] = field(default_factory=list)

    def log(self, subject: str, before: str, after: str, reason: str) -> None:
        self.transitions.append(
            {
                "order_id": self.order_id,
                "subject": subject,
                "from_status": before,
                "to_status": after,
                "reason": reason,
                "event_id": self.event_id,
            }
        )

    def move_order(self, status: str, reason: str) -> None:
        if self.order_status != status:
            self.log("order", self.order_status, status, reason)
            self.order_status = status


def apply_payment_status(
    session: Session,
    payment: PaymentState,
    target: str,
    *,
    reason: str,
    event_id: int | None = None,
    final_failure: bool = False,
) -> bool:
    """Move one locked payment toward `target` (see plan_payment_changes).
    Returns False (and changes nothing) when the move would go backwards or
    nowhere: a replay or a late event."""
    steps = payments.path_to(payment.status, target)
    if not steps:
        return False
    change = PaymentChange(payment, target, reason, event_id, final_failure)
    plan_payment_changes(session, [change]).write(session)
    if isinstance(payment, Payment):
        # An ORM caller's object shows the new status, without a flush that
        # would write it a second time.
        set_committed_value(payment, "status", steps[-1])
    return True


@dataclass
class PaymentPlan:
    """What plan_payment_changes decided, still to be written."""

    declined: list[PaymentChange] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    sold: list[tuple[str, str, int]] = field(default_factory=list)

    def write(self, session: Session, *more: Write) -> None:
        """The sales' units, then the payments', orders', transitions' and
        sales' rows, with `more` writes of the caller's about other rows, in
        one statement."""
        # Products last of the rows this transaction locks, so a popular
        # SKU's row is held for one statement and the commit.
        sales = stock.sell_reserved(session, self.sold)
        write_together(session.connection(), [*self.writes, *more, *sales])


def plan_payment_changes(
    session: Session, changes: Sequence[PaymentChange], *, batched: bool = False
) -> PaymentPlan:
    """Move locked payments toward their targets and apply what that means
    for their orders (locked here, after the payments) and stock: a handful
    of statements however many payments move, the last of them left to the
    plan's `write`. Each change must be for a different order. A move that
    would go backwards or nowhere (a replay, a late event) changes nothing.

    `batched` (several events in one transaction) declines, and leaves
    untouched, every change that would lock product rows before the end (a
    release, a sale without a reservation): a batch then locks products only
    in its last statement, in SKU order, and two batches never deadlock. The
    caller applies those alone."""
    planned = [
        (change, steps)
        for change in changes
        if (steps := payments.path_to(change.payment.status, change.target))
    ]
    if not planned:
        return PaymentPlan()
    connection = session.connection()
    order_ids = sorted({change.payment.order_id for change, _ in planned})
    assert len(order_ids) == len(planned), "one change per order"
    # Only `succeeded` consumes, and it is always a path's first step.
    succeeding = [c.payment.order_id for c, steps in planned if steps[0] == "succeeded"]
    was: dict[uuid.UUID, str] = {}
    consumed: dict[uuid.UUID, list[stock.Line]] = {}
    params = {"order_ids": order_ids, "succeeding": succeeding, "awaiting": sorted(_AWAITING_PAYMENT)}
    for row in connection.execute(_LOCK_ORDERS_CONSUMING, params):
        if row.sku is None:
            was[row.order_id] = row.status
        else:
            consumed.setdefault(row.order_id, []).append((row.sku, row.quantity))
    consumed = {order_id: sorted(lines) for order_id, lines in consumed.items()}
    declined = []
    if batched:
        declined = [
            change
            for change, steps in planned
            if _moves_stock_midway(change, steps[0], was[change.payment.order_id], consumed)
        ]
        planned = [(change, steps) for change, steps in planned if change not in declined]
        if not planned:
            return PaymentPlan(declined)
    all_moves: list[_Moves] = []
    payment_moves: dict[uuid.UUID, str] = {}
    order_moves: dict[uuid.UUID, str] = {}
    for change, steps in planned:
        order_id = change.payment.order_id
        moves = _Moves(order_id, was[order_id], change.event_id, consumed.get(order_id, []))
        status = change.payment.status
        for step in steps:
            moves.log("payment", status, step, change.reason)
            status = step
            failure = step == "failed" and change.final_failure
            effect = _on_final_failure if failure else _ORDER_EFFECTS.get(step)
            (effect or _no_effect)(session, moves, change.reason)
        all_moves.append(moves)
        payment_moves[change.payment.id] = status
        if moves.order_status != was[order_id]:
            order_moves[order_id] = moves.order_status
    writes = [_SET_PAYMENTS.write(payment_moves)]
    if order_moves:
        writes.append(_SET_ORDERS.write(order_moves))
    transitions = [row for moves in all_moves for row in moves.transitions]
    if transitions:
        writes.append(_LOG_TRANSITIONS.write(transitions))
    sold = [(str(m.order_id), sku, n) for m in all_moves for sku, n in m.sold]
    return PaymentPlan(declined, writes, sold)


def _moves_stock_midway(
    change: PaymentChange, first_step: str, order_status: str, consumed: dict[uuid.UUID, list[stock.Line]]
) -> bool:
    """Whether a change's effect locks product rows as it runs (see the
    effects below): a release, or a sale of units no reservation holds."""
    if first_step == "succeeded":
        reserved = order_status in _AWAITING_PAYMENT and bool(consumed.get(change.payment.order_id))
        return order_status in _UNFILLED and not reserved
    releases = first_step == "canceled" or (first_step == "failed" and change.final_failure)
    return releases and order_status in _AWAITING_PAYMENT


def _on_succeeded(session: Session, moves: _Moves, reason: str) -> None:
    reference = str(moves.order_id)
    was = moves.order_status
    if was in _AWAITING_PAYMENT and moves.consumed:
        moves.sold = moves.consumed
        moves.move_order("paid", reason)
        return
    if was not in _UNFILLED:
        return
    # The reservation is gone (the order expired, or its hold was released
    # while the payment was still processing): take the units again if they
    # are there. The money record is kept either way; an order that cannot be
    # filled needs a person.
    rows = session.connection().execute(_ORDER_LINES, {"order_id": moves.order_id})
    if stock.sell_unreserved(session, [(sku, quantity) for sku, quantity in rows], reference):
        moves.move_order("paid", f"{reason}; stock taken again after {was}")
    else:
        moves.move_order("needs_attention", f"{reason}; stock gone after {was}")


# Orders a success fills from their reservation while it is held: an order
# still waiting, or one the expire job handed to a person because its
# payment stayed pending too long (it may still succeed).
_AWAITING_PAYMENT = frozenset({"pending_payment", "needs_attention"})
# Orders a late success can still fill: their units are no longer held. An
# order that needs attention with its payment already succeeded (stock gone)
# never sees a second success, so listing it here fills only the stalled kind.
_UNFILLED = frozenset({"pending_payment", "expired", "failed", "canceled", "needs_attention"})


def _on_canceled(session: Session, moves: _Moves, reason: str) -> None:
    if moves.order_status in _AWAITING_PAYMENT:
        stock.release(session, moves.order_id)
        moves.move_order("canceled", reason)


def _on_final_failure(session: Session, moves: _Moves, reason: str) -> None:
    if moves.order_status in _AWAITING_PAYMENT:
        stock.release(session, moves.order_id)
        moves.move_order("failed", reason)


def _on_refunded(session: Session, moves: _Moves, reason: str) -> None:
    # Money went back; goods only come back through a return.
    moves.move_order("refunded", reason)


def _no_effect(session: Session, moves: _Moves, reason: str) -> None:
    return None


# What reaching each payment status does to the order. `failed` and
# `processing` have no effect on purpose: a failed card is not final at
# Stripe, so the reservation is kept until the payment window ends (a final
# failure, such as Monetbil's, releases it: see apply_payment_status).
_ORDER_EFFECTS = {
    "succeeded": _on_succeeded,
    "canceled": _on_canceled,
    "refunded": _on_refunded,
}


def _move_payment(
    session: Session, order: Order, payment: Payment, status: str, reason: str, event_id: int | None
) -> None:
    log_transition(session, order.id, "payment", payment.status, status, reason, event_id)
    payment.status = status
    payment.updated_at = datetime.now(UTC)


def _move_order(session: Session, order: Order, status: str, reason: str, event_id: int | None) -> None:
    if order.status == status:
        return
    log_transition(session, order.id, "order", order.status, status, reason, event_id)
    order.status = status
    order.updated_at = datetime.now(UTC)


def log_transition(
    session: Session,
    order_id: uuid.UUID,
    subject: str,
    before: str | None,
    after: str,
    reason: str,
    event_id: int | None = None,
) -> None:
    session.add(
        OrderTransition(
            order_id=order_id,
            subject=subject,
            from_status=before,
            to_status=after,
            reason=reason,
            event_id=event_id,
        )
    )


def _payment_of(session: Session, order_id: uuid.UUID) -> Payment:
    payment = session.scalars(select(Payment).where(Payment.order_id == order_id).with_for_update()).first()
    if payment is None:
        raise NotFound(f"order {order_id} has no payment")
    return payment


# --- after payment: pickup, completion, returns ----------------------------------

_READY_FROM = frozenset({"paid"})
_COMPLETE_FROM = frozenset({"paid", "ready_for_pickup"})
_RETURNABLE = frozenset({"paid", "ready_for_pickup", "completed", "refunded"})


def mark_ready_for_pickup(session: Session, order_id: uuid.UUID) -> Order:
    order = session.get_one(Order, order_id, with_for_update=True)
    if order.status != "ready_for_pickup":
        _require(order, _READY_FROM, "ready for pickup")
        order.ready_at = datetime.now(UTC)
        _move_order(session, order, "ready_for_pickup", "ready for pickup", None)
    return order


def complete(session: Session, order_id: uuid.UUID) -> Order:
    order = session.get_one(Order, order_id, with_for_update=True)
    if order.status != "completed":
        _require(order, _COMPLETE_FROM, "completed")
        order.completed_at = datetime.now(UTC)
        _move_order(session, order, "completed", "picked up", None)
    return order


def record_return(session: Session, order_id: uuid.UUID, lines: tuple[stock.Line, ...]) -> Order:
    """Goods of a sold order come back: a `return` movement per line, never
    more units per SKU than the order sold, counting earlier returns."""
    order = session.get_one(Order, order_id, with_for_update=True)
    _require(order, _RETURNABLE, "returned")
    # What the ledger says was sold, not what was ordered: an order that
    # never got its stock (needs_attention, then refunded) sold nothing.
    ordered = {line.sku for line in order.lines}
    sold = stock.units_by_type(session, str(order.id), "sale")
    returned = stock.units_by_type(session, str(order.id), "return")
    for sku, quantity in lines:
        if sku not in ordered:
            raise InvalidRequest(f"{sku} is not in order {order.id}", sku=sku)
        if returned.get(sku, 0) + quantity > sold.get(sku, 0):
            raise Conflict(
                f"order {order.id} sold {sold.get(sku, 0)} of {sku}; {returned.get(sku, 0)} already returned",
                sku=sku,
            )
    # Sorted, like every multi-row stock change, so two returns (or a return
    # and a checkout) lock the same SKUs in the same order and never deadlock.
    for sku, quantity in sorted(lines):
        stock.put_back(session, sku, quantity, str(order.id), "returned by customer")
    return order


def _require(order: Order, allowed: frozenset[str], becoming: str) -> None:
    if order.status not in allowed:
        raise Conflict(f"order {order.id} is {order.status}; it cannot be {becoming}", status=order.status)
