"""expire-stale-orders: unpaid orders past their payment window, asking
the provider first.

Each function takes a session and the gateways it needs and never commits:
the job's adapter opens one transaction per batch and commits it. Every
function returns counts (a Counter) that the run record keeps.

Locks follow the payment path's order (payment, then order), and the batch
query skips rows someone else holds (`SKIP LOCKED`): a webhook applying a
payment right now wins, and the job meets that order again next run.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain import payments, stock
from domain.errors import ProviderError
from domain.gateways import MonetbilCheck, PaymentIntent
from domain.models import Order, Payment
from domain.orders import apply_payment_status, log_transition

log = logging.getLogger(__name__)

# Stripe statuses a cancel may end. `processing` is deliberately not one:
# money may be on its way, so it is left for the payment path.
CANCELLABLE = frozenset(
    {"requires_payment_method", "requires_confirmation", "requires_action", "requires_capture"}
)
UNEXPECTED_STATE = "payment_intent_unexpected_state"


class StripeIntents(Protocol):
    def retrieve_payment_intent(self, intent_id: str) -> PaymentIntent: ...

    def cancel_payment_intent(
        self, intent_id: str, *, reason: str, idempotency_key: str
    ) -> PaymentIntent: ...

    def list_payment_intents(self, *, created_gte: int) -> Iterable[PaymentIntent]: ...


class PaymentChecker(Protocol):
    def check_transaction(self, transaction_id: str) -> MonetbilCheck: ...


def cancel_key(intent_id: str, run_id: int) -> str:
    """One idempotency key per PaymentIntent and run: the library's retries
    and a re-ask within the run are one cancel at Stripe. Not one key for
    ever: Stripe keeps a refusal under its key for 24 hours, and the next
    run must really ask again."""
    return f"payfleet-abandon-{intent_id}-{run_id}"


def expire_order(session: Session, payment: Payment, order: Order, reason: str, payment_status: str) -> int:
    """A locked, unpaid order past its window: its reservations go back to
    the shelf, its payment closes as `payment_status`, the order expires.
    Returns the units released."""
    released = stock.release(session, order.id)
    if payments.can_move(payment.status, payment_status):
        log_transition(session, order.id, "payment", payment.status, payment_status, reason)
        payment.status = payment_status
        payment.updated_at = datetime.now(UTC)
    log_transition(session, order.id, "order", order.status, "expired", reason)
    order.status = "expired"
    order.updated_at = datetime.now(UTC)
    return sum(quantity for _, quantity in released)


def _stale_orders(
    session: Session, now: datetime, after: uuid.UUID | None, limit: int
) -> Sequence[tuple[Payment, Order]]:
    query = (
        select(Payment, Order)
        .join(Order, Order.id == Payment.order_id)
        .where(Order.status == "pending_payment", Order.expires_at < now)
        .order_by(Order.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if after is not None:
        query = query.where(Order.id > after)
    return [(payment, order) for payment, order in session.execute(query).all()]


def expire_stale_orders(
    session: Session,
    stripe: StripeIntents,
    monetbil: PaymentChecker | None,
    now: datetime,
    *,
    run_id: int,
    after: uuid.UUID | None = None,
    limit: int = 100,
) -> tuple[Counter[str], uuid.UUID | None]:
    """One batch of unpaid orders past their payment window, asking the
    provider first. Returns the counts and the last order id seen (the next
    batch starts after it; None when this was the last batch)."""
    counts: Counter[str] = Counter()
    rows = _stale_orders(session, now, after, limit)
    for payment, order in rows:
        counts["examined"] += 1
        try:
            counts.update(_settle_stale(session, stripe, monetbil, payment, order, run_id))
        except ProviderError as error:
            # Left pending: the next run asks again.
            log.warning("order %s left pending: %s", order.id, error.detail)
            counts["provider_errors"] += 1
    last = rows[-1][1].id if len(rows) == limit else None
    return counts, last


def _settle_stale(
    session: Session,
    stripe: StripeIntents,
    monetbil: PaymentChecker | None,
    payment: Payment,
    order: Order,
    run_id: int,
) -> Counter[str]:
    if payment.provider == "stripe":
        if not payment.provider_payment_id:
            return _expired(session, payment, order, "no PaymentIntent was ever created", "canceled")
        intent = stripe.retrieve_payment_intent(payment.provider_payment_id)
        return follow_intent(
            session, stripe, payment, order, intent, job="expire-stale-orders", run_id=run_id
        )
    return _settle_monetbil(session, monetbil, payment, order)


def _expired(session: Session, payment: Payment, order: Order, why: str, payment_status: str) -> Counter[str]:
    units = expire_order(session, payment, order, f"payment window ended: {why}", payment_status)
    return Counter({"expired": 1, "units_released": units})


def follow_intent(
    session: Session,
    stripe: StripeIntents,
    payment: Payment,
    order: Order,
    intent: PaymentIntent,
    *,
    job: str,
    run_id: int,
    retried: bool = False,
) -> Counter[str]:
    """An unpaid order past its window, given what Stripe says of its
    PaymentIntent: paid if it succeeded (through the webhook's own code path),
    left alone while processing, otherwise cancelled at Stripe and expired."""
    if intent.status == "succeeded":
        apply_payment_status(session, payment, "succeeded", reason=f"{job}: Stripe says succeeded")
        return Counter({"paid": 1})
    if intent.status == "processing":
        return Counter({"left_processing": 1})
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
            fresh = stripe.retrieve_payment_intent(intent.id)
            return follow_intent(session, stripe, payment, order, fresh, job=job, run_id=run_id, retried=True)
        canceled = 1
    if intent.status != "canceled":
        raise ProviderError(f"PaymentIntent {intent.id} is {intent.status}; nothing to do with it")
    counts = _expired(session, payment, order, "PaymentIntent cancelled", "canceled")
    counts["payment_intents_canceled"] += canceled
    return counts


# Monetbil's check-payment answer, for an order past its window.
_MONETBIL_FINAL = {"failed": "failed", "canceled": "canceled"}


def _settle_monetbil(
    session: Session, monetbil: PaymentChecker | None, payment: Payment, order: Order
) -> Counter[str]:
    if not payment.provider_payment_id:
        # No transaction was ever started: nothing to ask, nothing can arrive.
        return _expired(session, payment, order, "no Monetbil transaction", "canceled")
    if monetbil is None:
        raise ProviderError("Monetbil is not configured")
    check = monetbil.check_transaction(payment.provider_payment_id)
    status = check.status
    if check.covers(payment.amount, payment.currency):
        apply_payment_status(
            session, payment, "succeeded", reason="expire-stale-orders: Monetbil says succeeded"
        )
        return Counter({"paid": 1})
    if status == "succeeded":
        # Paid, but not this payment's amount: it does not pay the order.
        reason = (
            f"Monetbil reports {check.amount} {check.currency} paid, not {payment.amount} {payment.currency}"
        )
        return _expired(session, payment, order, reason, "failed") + Counter({"underpaid": 1})
    if status in _MONETBIL_FINAL:
        return _expired(session, payment, order, f"Monetbil says {status}", _MONETBIL_FINAL[status])
    return Counter({"left_processing": 1})
