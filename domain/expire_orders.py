"""expire-stale-orders: unpaid orders past their payment window, asking
the provider first.

A batch is read without locks, the provider is asked about each order with
no transaction open (the calls of a batch run side by side), and only then
is each order locked and re-checked in a short transaction of its own: a
slow provider never holds a row lock, and an order a webhook paid meanwhile
is left as it is. Functions here take a session and never commit; every
one returns counts (a Counter) that the run record keeps.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, cast

from sqlalchemy import Connection, Table, bindparam, func, insert, select, tuple_, update
from sqlalchemy.orm import Session

from domain import payments, stock
from domain.errors import ProviderError
from domain.gateways import MonetbilCheck, PaymentIntent
from domain.models import Order, OrderTransition, Payment
from domain.orders import apply_payment_status, log_transition

log = logging.getLogger(__name__)

# Stripe statuses a cancel may end. `processing` is deliberately not one:
# money may be on its way, so it is left for the payment path.
CANCELLABLE = frozenset(
    {"requires_payment_method", "requires_confirmation", "requires_action", "requires_capture"}
)
UNEXPECTED_STATE = "payment_intent_unexpected_state"
JOB = "expire-stale-orders"


class StripeIntents(Protocol):
    def retrieve_payment_intent(self, intent_id: str) -> PaymentIntent: ...

    def cancel_payment_intent(
        self, intent_id: str, *, reason: str, idempotency_key: str
    ) -> PaymentIntent: ...

    def list_payment_intents(self, *, created_gte: int) -> Iterable[PaymentIntent]: ...

    def list_payment_intents_after(self, intent_id: str) -> Iterable[PaymentIntent]: ...


class PaymentChecker(Protocol):
    def check_transaction(self, transaction_id: str) -> MonetbilCheck: ...


def cancel_key(intent_id: str, run_id: int) -> str:
    """One idempotency key per PaymentIntent and run: the library's retries
    and a re-ask within the run are one cancel at Stripe. Not one key for
    ever: Stripe keeps a refusal under its key for 24 hours, and the next
    run must really ask again."""
    return f"payfleet-abandon-{intent_id}-{run_id}"


@dataclass(frozen=True)
class StaleOrder:
    """An unpaid order past its window, as read before the provider is asked."""

    order_id: uuid.UUID
    provider: str
    provider_payment_id: str | None
    amount: int
    currency: str
    expires_at: datetime

    def overdue(self, now: datetime, attention_after: timedelta) -> bool:
        """Whether its payment has had its window and `attention_after` more."""
        return now - self.expires_at >= attention_after


@dataclass(frozen=True)
class Verdict:
    """What the provider says should become of a stale order's payment:
    `succeeded` (the order is paid), `processing` (left for the payment path),
    a final `canceled`/`failed` (the order expires), or `unanswered` (the
    provider failed; only an overdue order is settled with it)."""

    status: str
    reason: str
    counts: Counter[str] = field(default_factory=Counter)


def stale_orders(
    session: Session, now: datetime, *, after: StaleOrder | None, limit: int
) -> list[StaleOrder]:
    """Up to `limit` unpaid orders past their window, oldest window first,
    after `after`; nothing is locked. Neighbours in this order were created
    close together, so Stripe's list holds a batch's PaymentIntents side by
    side (see `listed_intents`)."""
    query = (
        select(
            Order.id,
            Payment.provider,
            Payment.provider_payment_id,
            Payment.amount,
            Payment.currency,
            Order.expires_at,
        )
        .join(Payment, Payment.order_id == Order.id)
        .where(Order.status == "pending_payment", Order.expires_at < now)
        .order_by(Order.expires_at, Order.id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(tuple_(Order.expires_at, Order.id) > tuple_(after.expires_at, after.order_id))
    return [StaleOrder(*row) for row in session.execute(query)]


def ask_provider(
    stripe: StripeIntents,
    monetbil: PaymentChecker | None,
    order: StaleOrder,
    run_id: int,
    *,
    listed: PaymentIntent | None = None,
) -> Verdict:
    """The provider's word on a stale order; network only, no session. A
    cancellable PaymentIntent is cancelled here (cancelling is what makes the
    order safe to expire: a cancelled intent can never succeed). `listed` is
    the intent as Stripe's list just gave it, which spares the retrieve."""
    if order.provider == "stripe":
        if not order.provider_payment_id:
            return Verdict("canceled", "no PaymentIntent was ever created")
        intent = listed or stripe.retrieve_payment_intent(order.provider_payment_id)
        return follow_intent(stripe, intent, run_id)
    return _ask_monetbil(monetbil, order)


# Pages of Stripe's list read for one batch at most: past them, the batch's
# stretch of time holds mostly other intents (paid ones), and retrieving the
# rest one by one is cheaper than paging on.
LIST_PAGES_PER_BATCH = 3
LIST_PAGE = 100


def listed_intents(stripe: StripeIntents, batch: Sequence[StaleOrder]) -> dict[str, PaymentIntent]:
    """The batch's PaymentIntents as Stripe's list gives them, a hundred a
    call, in place of one retrieve each. The batch is in checkout order, so
    its intents follow its first one in Stripe's list, oldest first: the list
    is read from there. Read at the same moment as a retrieve would be, so
    what follows (cancel, or pay) is decided on the same word. Intents not
    found within a few pages (and the first one) are left out, to be
    retrieved one by one; a failed list is the same as an empty one."""
    intents = [o.provider_payment_id for o in batch if o.provider == "stripe" and o.provider_payment_id]
    if len(intents) < 2:
        return {}
    wanted = set(intents[1:])
    found: dict[str, PaymentIntent] = {}
    try:
        for read, intent in enumerate(stripe.list_payment_intents_after(intents[0]), start=1):
            if intent.id in wanted:
                found[intent.id] = intent
            if len(found) == len(wanted) or read >= LIST_PAGES_PER_BATCH * LIST_PAGE:
                break
    except ProviderError as error:
        log.warning("listing PaymentIntents failed; asking one by one: %s", error.detail)
    return found


def follow_intent(
    stripe: StripeIntents, intent: PaymentIntent, run_id: int, *, retried: bool = False
) -> Verdict:
    """Paid if it succeeded, left alone while processing, otherwise cancelled
    at Stripe (and then the order may expire)."""
    if intent.status == "succeeded":
        return Verdict("succeeded", "Stripe says succeeded")
    if intent.status == "processing":
        return Verdict("processing", "Stripe says processing")
    canceled = 0
    if intent.status in CANCELLABLE:
        try:
            intent = stripe.cancel_payment_intent(
                intent.id, reason="abandoned", idempotency_key=cancel_key(intent.id, run_id)
            )
        except ProviderError as error:
            # It moved between our read and our cancel (paid at the last
            # second): read it again and follow what it is now.
            if error.extra.get("provider_code") != UNEXPECTED_STATE or retried:
                raise
            return follow_intent(stripe, stripe.retrieve_payment_intent(intent.id), run_id, retried=True)
        canceled = 1
    if intent.status != "canceled":
        raise ProviderError(f"PaymentIntent {intent.id} is {intent.status}; nothing to do with it")
    return Verdict("canceled", "PaymentIntent cancelled", Counter({"payment_intents_canceled": canceled}))


# Monetbil's check-payment answer, for an order past its window.
_MONETBIL_FINAL = {"failed": "failed", "canceled": "canceled"}


def _ask_monetbil(monetbil: PaymentChecker | None, order: StaleOrder) -> Verdict:
    if not order.provider_payment_id:
        # No transaction was ever started: nothing to ask, nothing can arrive.
        return Verdict("canceled", "no Monetbil transaction")
    if monetbil is None:
        raise ProviderError("Monetbil is not configured")
    check = monetbil.check_transaction(order.provider_payment_id)
    if check.covers(order.amount, order.currency):
        return Verdict("succeeded", "Monetbil says succeeded")
    if check.status == "succeeded":
        # Paid, but not this payment's amount: it does not pay the order.
        reason = f"Monetbil reports {check.amount} {check.currency} paid, not {order.amount} {order.currency}"
        return Verdict("failed", reason, Counter({"underpaid": 1}))
    if check.status in _MONETBIL_FINAL:
        return Verdict(_MONETBIL_FINAL[check.status], f"Monetbil says {check.status}")
    return Verdict("processing", f"Monetbil says {check.status}")


def settle(
    session: Session, order: StaleOrder, verdict: Verdict, now: datetime, attention_after: timedelta
) -> Counter[str]:
    """Lock the order's payment, then the order (the payment path's order),
    re-check that it is still unpaid and past its window, and apply the
    verdict. What the provider side did (a cancel) is counted either way.

    A payment the provider still calls pending (or keeps failing to answer
    about) `attention_after` past the window is not asked about for ever: the
    order moves to `needs_attention`, with the reason in its timeline.

    This runs once per stale order, so it speaks Core on the session's
    connection: the ORM's loading and flush bookkeeping cost more than the
    five statements an expiry needs."""
    counts = Counter(verdict.counts)
    connection = session.connection()
    payment = connection.execute(_LOCK_PAYMENT, {"order_id": order.order_id}).one()
    status, expires_at = connection.execute(_LOCK_ORDER, {"order_id": order.order_id}).one()
    if status != "pending_payment" or expires_at >= now:
        counts["changed_meanwhile"] += 1
        return counts
    if verdict.status == "succeeded":
        apply_payment_status(session, payment, "succeeded", reason=f"{JOB}: {verdict.reason}")
        return counts + Counter({"paid": 1})
    if verdict.status in STILL_OPEN:
        return counts + _hold_or_hand_over(
            connection, order.order_id, verdict, now - expires_at, attention_after
        )
    reason = f"payment window ended: {verdict.reason}"
    moves = [_transition(order.order_id, "order", "pending_payment", "expired", reason)]
    if payments.can_move(payment.status, verdict.status):
        moves.insert(0, _transition(order.order_id, "payment", payment.status, verdict.status, reason))
        connection.execute(_SET_PAYMENT, {"payment_id": payment.id, "new_status": verdict.status})
    connection.execute(_SET_ORDER, {"order_id": order.order_id, "new_status": "expired"})
    connection.execute(_LOG_TRANSITIONS, moves)
    # Products last, so a popular SKU's row is held only until the commit.
    released = stock.release(session, order.order_id)
    return counts + Counter({"expired": 1, "units_released": sum(quantity for _, quantity in released)})


# Verdicts that leave the payment open: money may still come.
STILL_OPEN = frozenset({"processing", "unanswered"})


def _hold_or_hand_over(
    connection: Connection, order_id: uuid.UUID, verdict: Verdict, late: timedelta, attention_after: timedelta
) -> Counter[str]:
    """A payment still open past its window: left for the payment path, or,
    once `attention_after` past it, the order is handed to a person. Its
    reservation is left as it is either way: the money may still arrive
    (a success then fills the order from it, see orders._AWAITING_PAYMENT),
    and an unpaid hold goes back to the shelf through
    release-expired-reservations like any other."""
    if late < attention_after:
        return Counter({"left_processing": int(verdict.status == "processing")})
    hours = late.total_seconds() / 3600
    reason = f"payment still open {hours:.1f} h after its window ended: {verdict.reason}"
    connection.execute(_SET_ORDER, {"order_id": order_id, "new_status": "needs_attention"})
    connection.execute(
        _LOG_TRANSITIONS, [_transition(order_id, "order", "pending_payment", "needs_attention", reason)]
    )
    return Counter({"needs_attention": 1})


_ORDERS = cast(Table, Order.__table__)
_PAYMENTS = cast(Table, Payment.__table__)
_TRANSITIONS = cast(Table, OrderTransition.__table__)
_LOCK_PAYMENT = (
    select(_PAYMENTS.c.id, _PAYMENTS.c.order_id, _PAYMENTS.c.status)
    .where(_PAYMENTS.c.order_id == bindparam("order_id"))
    .with_for_update()
)
_LOCK_ORDER = (
    select(_ORDERS.c.status, _ORDERS.c.expires_at)
    .where(_ORDERS.c.id == bindparam("order_id"))
    .with_for_update()
)
_SET_PAYMENT = (
    update(_PAYMENTS)
    .where(_PAYMENTS.c.id == bindparam("payment_id"))
    .values(status=bindparam("new_status"), updated_at=func.now())
)
_SET_ORDER = (
    update(_ORDERS)
    .where(_ORDERS.c.id == bindparam("order_id"))
    .values(status=bindparam("new_status"), updated_at=func.now())
)
_LOG_TRANSITIONS = insert(_TRANSITIONS)


def _transition(order_id: uuid.UUID, subject: str, before: str, after: str, reason: str) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "subject": subject,
        "from_status": before,
        "to_status": after,
        "reason": reason,
        "event_id": None,
    }


def expire_order(session: Session, payment: Payment, order: Order, reason: str, payment_status: str) -> int:
    """A locked, unpaid order past its window: its payment closes as
    `payment_status`, the order expires, and its reservations go back to the
    shelf (products last, held only until the commit). Returns the units
    released."""
    if payments.can_move(payment.status, payment_status):
        log_transition(session, order.id, "payment", payment.status, payment_status, reason)
        payment.status = payment_status
        payment.updated_at = datetime.now(UTC)
    log_transition(session, order.id, "order", order.status, "expired", reason)
    order.status = "expired"
    order.updated_at = datetime.now(UTC)
    session.flush()
    released = stock.release(session, order.id)
    return sum(quantity for _, quantity in released)
