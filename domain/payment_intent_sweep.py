"""cleanup-stale-payment-intents: the weekly sweep of Stripe payments left
open, and of the PaymentIntents Stripe itself lists.

A succeeded intent repairs its order through the webhook's own code path
and is never cancelled; a cancellable one is cancelled only when its order
can no longer be paid.

Like expire-stale-orders, no row lock waits on Stripe: a batch is read
without locks (`open_stripe_payments`, `payments_for_intents`), Stripe is
asked with no transaction open (`ask_stripe`, `handle_orphan`), and only
then is each payment locked, re-checked and settled in a short transaction
of its own (`settle`): an order a webhook or the expire job settled
meanwhile is left as it is. Functions here take a session and never commit;
every one returns counts (a Counter) that the run record keeps.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from domain import payments
from domain.errors import ProviderError
from domain.expire_orders import CANCELLABLE, UNEXPECTED_STATE, StripeIntents, cancel_key, expire_order
from domain.gateways import PaymentIntent
from domain.models import Order, Payment
from domain.orders import apply_payment_status

log = logging.getLogger(__name__)

OPEN_PAYMENT_STATUSES = ("pending", "processing", "failed")
SWEEP = "cleanup-stale-payment-intents"


class NotConfigured(Exception):
    """No Stripe account here (STRIPE_API_KEY empty): there is nothing to
    sweep, so the run is recorded skipped with this reason, not failed."""


@dataclass(frozen=True)
class OpenPayment:
    """A Stripe payment and its order as read before Stripe is asked (no
    lock held: `settle` locks and re-checks)."""

    payment_id: uuid.UUID
    intent_id: str | None  # None: its checkout never stored it (found by metadata)
    order_status: str
    expires_at: datetime

    def payable(self, now: datetime) -> bool:
        return self.order_status == "pending_payment" and self.expires_at > now


@dataclass(frozen=True)
class StripeAnswer:
    """The intent as Stripe last showed it, and what asking did there."""

    intent: PaymentIntent
    counts: Counter[str] = field(default_factory=Counter)


_OPEN_PAYMENT = select(Payment.id, Payment.provider_payment_id, Order.status, Order.expires_at).join(
    Order, Order.id == Payment.order_id
)


def open_stripe_payments(
    session: Session, now: datetime, window: timedelta, *, after: uuid.UUID | None = None, limit: int = 50
) -> list[OpenPayment]:
    """Stripe payments still open longer than their window, by id after
    `after`; nothing is locked."""
    query = (
        _OPEN_PAYMENT.where(
            Payment.provider == "stripe",
            Payment.status.in_(OPEN_PAYMENT_STATUSES),
            Payment.provider_payment_id.is_not(None),
            Payment.created_at < now - window,
        )
        .order_by(Payment.id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(Payment.id > after)
    return [OpenPayment(*row) for row in session.execute(query)]


def payments_for_intents(session: Session, intents: Sequence[PaymentIntent]) -> dict[str, OpenPayment]:
    """Our payments for listed intents, by intent id: found by the intent id,
    else by the payment id in its metadata (a checkout that never stored the
    intent id); nothing is locked."""
    by_metadata = {pid: intent.id for intent in intents if (pid := _metadata_payment_id(intent))}
    ids = [intent.id for intent in intents]
    query = _OPEN_PAYMENT.where(
        Payment.provider == "stripe",
        or_(Payment.provider_payment_id.in_(ids), Payment.id.in_(list(by_metadata))),
    )
    found: dict[str, OpenPayment] = {}
    metadata_only: dict[str, OpenPayment] = {}
    for row in session.execute(query):
        payment = OpenPayment(*row)
        if payment.intent_id in ids:
            found[payment.intent_id] = payment
        elif payment.payment_id in by_metadata:
            metadata_only[by_metadata[payment.payment_id]] = payment
    return metadata_only | found


def _metadata_payment_id(intent: PaymentIntent) -> uuid.UUID | None:
    try:
        return uuid.UUID(intent.metadata.get("payment_id", ""))
    except ValueError:
        return None


def ask_stripe(
    stripe: StripeIntents,
    payment: OpenPayment,
    now: datetime,
    *,
    run_id: int,
    intent: PaymentIntent | None = None,
) -> StripeAnswer:
    """Network only, no session: the payment's intent (fetched unless given),
    cancelled at Stripe when it is cancellable and its order, as read, can no
    longer be paid. That read may be stale, but only towards payable: an
    order's window never reopens and an ended order never pends again."""
    if intent is None:
        assert payment.intent_id is not None
        intent = stripe.retrieve_payment_intent(payment.intent_id)
    if intent.status not in CANCELLABLE or payment.payable(now):
        return StripeAnswer(intent)
    intent = _cancel_or_reread(stripe, intent, run_id)
    return StripeAnswer(intent, Counter({"payment_intents_canceled": int(intent.status == "canceled")}))


def settle(session: Session, payment: OpenPayment, answer: StripeAnswer, now: datetime) -> Counter[str]:
    """Lock the payment, then its order (the payment path's order), and make
    the payment agree with what Stripe said, re-checking the order as it is
    now. A succeeded intent repairs the payment through the webhook's code
    path; a cancelled one expires an order still pending past its window, or
    only catches the money record up for an order that already ended."""
    counts = +answer.counts
    locked = session.get_one(Payment, payment.payment_id, with_for_update=True)
    order = session.get_one(Order, locked.order_id, with_for_update=True)
    intent = answer.intent
    if locked.provider_payment_id is None:
        session.execute(
            update(Payment)
            .where(Payment.id == locked.id, Payment.provider_payment_id.is_(None))
            .values(provider_payment_id=intent.id)
        )
    if order.status != payment.order_status:
        counts["changed_meanwhile"] += 1
    if intent.status == "succeeded":
        repaired = apply_payment_status(
            session, locked, "succeeded", reason=f"{SWEEP}: Stripe says succeeded"
        )
        return counts + Counter({"repaired": int(repaired)})
    if intent.status == "processing":
        return counts + Counter({"left_processing": 1})
    if order.status == "pending_payment" and order.expires_at > now:
        return counts + Counter({"still_payable": 1})
    if intent.status != "canceled":
        # Left open at Stripe (its cancel was refused): the next sweep asks again.
        return counts + Counter({"left_open": 1})
    if order.status == "pending_payment":
        reason = "payment window ended: PaymentIntent cancelled"
        units = expire_order(session, locked, order, reason, "canceled")
        return counts + Counter({"expired": 1, "units_released": units})
    if payments.can_move(locked.status, "canceled"):
        # The order already ended (expired, failed, canceled): only the money
        # record catches up.
        apply_payment_status(session, locked, "canceled", reason=f"{SWEEP}: Stripe says canceled")
        counts["synced"] += 1
    return counts


def handle_orphan(stripe: StripeIntents, intent: PaymentIntent, *, run_id: int) -> Counter[str]:
    """Network only: a listed intent with no payment of ours. One that names
    a payment of ours in its metadata, whose checkout never committed, can
    never pay an order: cancelled if it still can be. Others are left alone."""
    ours = "payment_id" in intent.metadata or "order_id" in intent.metadata
    if not ours:
        return Counter({"listed_foreign": 1})
    if intent.status not in CANCELLABLE:
        return Counter({"orphans_seen": 1})
    canceled = int(_cancel_or_reread(stripe, intent, run_id).status == "canceled")
    return Counter({"orphans_canceled": canceled, "payment_intents_canceled": canceled})


def _cancel_or_reread(stripe: StripeIntents, intent: PaymentIntent, run_id: int) -> PaymentIntent:
    try:
        return stripe.cancel_payment_intent(
            intent.id, reason="abandoned", idempotency_key=cancel_key(intent.id, run_id)
        )
    except ProviderError as error:
        # It moved between our read and our cancel (paid at the last second):
        # what it is now decides.
        if error.extra.get("provider_code") != UNEXPECTED_STATE:
            raise
        return stripe.retrieve_payment_intent(intent.id)
