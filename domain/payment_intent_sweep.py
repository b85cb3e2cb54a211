"""cleanup-stale-payment-intents: the weekly sweep of Stripe payments left
open, and of the PaymentIntents Stripe itself lists.

A succeeded intent repairs its order through the webhook's own code path
and is never cancelled; a cancellable one is cancelled only when its order
can no longer be paid. Functions take a session and never commit.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain import payments
from domain.errors import ProviderError
from domain.expire_orders import (
    CANCELLABLE,
    UNEXPECTED_STATE,
    StripeIntents,
    apply_verdict,
    cancel_key,
    follow_intent,
)
from domain.gateways import PaymentIntent
from domain.models import Order, Payment
from domain.orders import apply_payment_status

log = logging.getLogger(__name__)

OPEN_PAYMENT_STATUSES = ("pending", "processing", "failed")
SWEEP = "cleanup-stale-payment-intents"


def open_stripe_payments(
    session: Session, now: datetime, window: timedelta, *, after: uuid.UUID | None = None, limit: int = 50
) -> Sequence[tuple[Payment, Order]]:
    """Stripe payments still open longer than their window, locked."""
    query = (
        select(Payment, Order)
        .join(Order, Order.id == Payment.order_id)
        .where(
            Payment.provider == "stripe",
            Payment.status.in_(OPEN_PAYMENT_STATUSES),
            Payment.provider_payment_id.is_not(None),
            Payment.created_at < now - window,
        )
        .order_by(Payment.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if after is not None:
        query = query.where(Payment.id > after)
    return [(payment, order) for payment, order in session.execute(query).all()]


def sweep_open_payments(
    session: Session,
    stripe: StripeIntents,
    now: datetime,
    window: timedelta,
    *,
    run_id: int,
    after: uuid.UUID | None = None,
    limit: int = 50,
) -> tuple[Counter[str], list[str], uuid.UUID | None]:
    """One batch of open Stripe payments, each synced with its
    PaymentIntent. Returns counts, the intent ids seen, and where the next
    batch starts (None: this was the last)."""
    counts: Counter[str] = Counter()
    seen: list[str] = []
    rows = open_stripe_payments(session, now, window, after=after, limit=limit)
    for payment, order in rows:
        assert payment.provider_payment_id is not None
        seen.append(payment.provider_payment_id)
        counts["examined"] += 1
        try:
            intent = stripe.retrieve_payment_intent(payment.provider_payment_id)
            counts.update(sync_intent(session, stripe, payment, order, intent, now, run_id=run_id))
        except ProviderError as error:
            log.warning("payment %s not synced: %s", payment.id, error.detail)
            counts["provider_errors"] += 1
    last = rows[-1][0].id if len(rows) == limit else None
    return counts, seen, last


def sync_intent(
    session: Session,
    stripe: StripeIntents,
    payment: Payment,
    order: Order,
    intent: PaymentIntent,
    now: datetime,
    *,
    run_id: int,
) -> Counter[str]:
    """Make a locked payment agree with Stripe. A succeeded intent repairs the
    payment through the webhook's code path and is never cancelled; a
    cancellable one is cancelled only when its order can no longer be paid."""
    if intent.status == "succeeded":
        repaired = apply_payment_status(
            session, payment, "succeeded", reason="cleanup-stale-payment-intents: Stripe says succeeded"
        )
        return Counter({"repaired": int(repaired)})
    if intent.status == "processing":
        return Counter({"left_processing": 1})
    payable = order.status == "pending_payment" and order.expires_at > now
    if payable:
        return Counter({"still_payable": 1})
    if order.status == "pending_payment":
        verdict = follow_intent(stripe, intent, run_id)
        return verdict.counts + apply_verdict(
            session, payment, order, verdict, "cleanup-stale-payment-intents"
        )
    counts: Counter[str] = Counter()
    if intent.status in CANCELLABLE:
        intent = _cancel_or_reread(stripe, intent, run_id)
        if intent.status == "succeeded":
            return sync_intent(session, stripe, payment, order, intent, now, run_id=run_id)
        counts["payment_intents_canceled"] += int(intent.status == "canceled")
    if intent.status == "canceled" and payments.can_move(payment.status, "canceled"):
        # The order already ended (expired, failed, canceled): only the money
        # record catches up.
        apply_payment_status(
            session, payment, "canceled", reason="cleanup-stale-payment-intents: Stripe says canceled"
        )
        counts["synced"] += 1
    return counts


def _cancel_or_reread(stripe: StripeIntents, intent: PaymentIntent, run_id: int) -> PaymentIntent:
    try:
        return stripe.cancel_payment_intent(
            intent.id, reason="abandoned", idempotency_key=cancel_key(intent.id, run_id)
        )
    except ProviderError as error:
        if error.extra.get("provider_code") != UNEXPECTED_STATE:
            raise
        return stripe.retrieve_payment_intent(intent.id)


def sync_listed_intent(
    session: Session,
    stripe: StripeIntents,
    intent: PaymentIntent,
    now: datetime,
    window: timedelta,
    *,
    run_id: int,
) -> Counter[str]:
    """A PaymentIntent Stripe lists: synced with our payment if we know it
    (by its id, or by the payment id in its metadata when the checkout never
    stored the intent id); an orphan of ours still open is cancelled."""
    payment = _payment_for_intent(session, intent)
    if payment is not None:
        order = session.get_one(Order, payment.order_id, with_for_update=True)
        if payment.provider_payment_id is None:
            payment.provider_payment_id = intent.id
        counts = sync_intent(session, stripe, payment, order, intent, now, run_id=run_id)
        counts["listed_known"] += 1
        return counts
    ours = "payment_id" in intent.metadata or "order_id" in intent.metadata
    if not ours:
        return Counter({"listed_foreign": 1})
    # Ours, but its checkout never committed: no order can ever be paid by it.
    if intent.status in CANCELLABLE:
        intent = _cancel_or_reread(stripe, intent, run_id)
        return Counter(
            {
                "orphans_canceled": int(intent.status == "canceled"),
                "payment_intents_canceled": int(intent.status == "canceled"),
            }
        )
    return Counter({"orphans_seen": 1})


def _payment_for_intent(session: Session, intent: PaymentIntent) -> Payment | None:
    query = select(Payment).where(Payment.provider == "stripe").with_for_update()
    found = session.scalars(query.where(Payment.provider_payment_id == intent.id)).first()
    if found is not None:
        return found
    try:
        payment_id = uuid.UUID(intent.metadata.get("payment_id", ""))
    except ValueError:
        return None
    return session.scalars(query.where(Payment.id == payment_id)).first()
