"""The work of the scheduled maintenance jobs, one batch at a time.

Each function takes a session and the gateways it needs and never commits:
the adapter that runs the job opens one transaction per batch and commits
it, so a batch's row locks, provider calls and effects land together. Every
function returns counts (a Counter) that the run record keeps.

Locks follow the payment path's order (payment, then order), and the batch
queries skip rows someone else holds (`SKIP LOCKED`): a webhook applying a
payment right now wins, and the job meets that order again next run.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sqlalchemy import delete, exists, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from domain import payments, stock
from domain.errors import ProviderError
from domain.gateways import MonetbilCheck, PaymentIntent
from domain.messaging import MessagingError
from domain.models import (
    Cart,
    Order,
    OrderTransition,
    Payment,
    ReviewRequest,
    StockReservation,
)
from domain.orders import apply_payment_status

log = logging.getLogger(__name__)

# Stripe statuses a cancel may end. `processing` is deliberately not one:
# money may be on its way, so it is left for the payment path.
CANCELLABLE = frozenset(
    {"requires_payment_method", "requires_confirmation", "requires_action", "requires_capture"}
)
OPEN_PAYMENT_STATUSES = ("pending", "processing", "failed")
# Orders whose payment went through; their stock is theirs.
PAID_ORDER_STATUSES = ("paid", "ready_for_pickup", "completed", "refunded")
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


# --- expiring an order -------------------------------------------------------


def expire_order(session: Session, payment: Payment, order: Order, reason: str, payment_status: str) -> int:
    """A locked, unpaid order past its window: its reservations go back to
    the shelf, its payment closes as `payment_status`, the order expires.
    Returns the units released."""
    released = stock.release(session, order.id)
    if payments.can_move(payment.status, payment_status):
        _log(session, order.id, "payment", payment.status, payment_status, reason)
        payment.status = payment_status
        payment.updated_at = datetime.now(UTC)
    _log(session, order.id, "order", order.status, "expired", reason)
    order.status = "expired"
    order.updated_at = datetime.now(UTC)
    return sum(quantity for _, quantity in released)


def _log(
    session: Session, order_id: uuid.UUID, subject: str, before: str | None, after: str, reason: str
) -> None:
    session.add(
        OrderTransition(
            order_id=order_id, subject=subject, from_status=before, to_status=after, reason=reason
        )
    )


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


# --- the weekly PaymentIntent sweep ----------------------------------------


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
        return follow_intent(
            session, stripe, payment, order, intent, job="cleanup-stale-payment-intents", run_id=run_id
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


# --- carts, reservations, reviews --------------------------------------------


def delete_expired_carts(session: Session, now: datetime, *, limit: int = 500) -> int:
    """Deletes up to `limit` carts past their expiry (their items go with
    them); returns how many."""
    doomed = (
        select(Cart.id)
        .where(Cart.expires_at < now)
        .order_by(Cart.expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return len(session.execute(delete(Cart).where(Cart.id.in_(doomed)).returning(Cart.id)).all())


def release_expired_reservations(
    session: Session, now: datetime, ttl: timedelta, *, after: uuid.UUID | None = None, limit: int = 100
) -> tuple[Counter[str], uuid.UUID | None]:
    """Active reservations older than `ttl` whose order is not paid go back
    to the shelf, one order at a time under its row lock. The order itself
    stays as it is (expiring it is the expire job's work)."""
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
    counts: Counter[str] = Counter()
    for order in orders:
        released = stock.release(session, order.id)
        counts["orders_released"] += 1
        counts["units_released"] += sum(quantity for _, quantity in released)
    return counts, orders[-1].id if len(orders) == limit else None


REVIEW_AFTER = timedelta(days=7)
# Orders older than this are not asked any more (a request weeks late is
# noise). Far wider than a day: a run that was skipped or failed, or a day
# the clocks change, leaves no order unasked; the next run takes them.
REVIEW_UNTIL = timedelta(days=14)


def request_reviews(
    session: Session, reference: datetime, run_id: int | None, *, limit: int = 500
) -> tuple[Counter[str], list[int]]:
    """Records one review request for up to `limit` orders completed at
    least 7 (and less than 14) days before `reference` that have none. The
    unique order_id makes this once per order, ever: a later run, or a
    racing replica, inserts nothing. Returns the counts and the ids of the
    requests to send."""
    query = (
        select(Order.id)
        .where(
            Order.status == "completed",
            Order.completed_at > reference - REVIEW_UNTIL,
            Order.completed_at <= reference - REVIEW_AFTER,
            ~exists().where(ReviewRequest.order_id == Order.id),
        )
        .order_by(Order.completed_at)
        .limit(limit)
    )
    rows = list(session.scalars(query))
    return _insert_requests(session, rows, run_id)


def _insert_requests(
    session: Session, order_ids: list[uuid.UUID], run_id: int | None
) -> tuple[Counter[str], list[int]]:
    counts: Counter[str] = Counter()
    to_send: list[int] = []
    for order in session.scalars(select(Order).where(Order.id.in_(order_ids))):
        phone = (order.customer_phone or "").strip() or None
        status = "pending" if phone else "skipped"
        inserted = session.execute(
            insert(ReviewRequest)
            .values(order_id=order.id, run_id=run_id, phone=phone, status=status, attempts=0)
            .on_conflict_do_nothing(index_elements=["order_id"])
            .returning(ReviewRequest.id)
        ).scalar()
        if inserted is None:
            continue
        if phone:
            counts["requested"] += 1
            to_send.append(inserted)
        else:
            counts["skipped_no_phone"] += 1
    return counts, to_send


def unsent_review_requests(session: Session, older_than: datetime, *, limit: int = 500) -> list[int]:
    """Pending requests whose message may have been lost (never attempted)."""
    query = (
        select(ReviewRequest.id)
        .where(
            ReviewRequest.status == "pending",
            ReviewRequest.attempts == 0,
            ReviewRequest.created_at < older_than,
        )
        .order_by(ReviewRequest.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def review_message(order: Order) -> str:
    return (
        f"Hello! You picked up your order {str(order.id)[:8]} a week ago. "
        "How did you like it? Reply to this message with a short review; it helps us a lot."
    )


@dataclass(frozen=True)
class ReviewSend:
    """A review request claimed for sending: what to send, and to whom."""

    request_id: int
    phone: str
    body: str


OUTCOME_UNKNOWN = "outcome_unknown"


def claim_review_request(
    session: Session, request_id: int, now: datetime, stale_after: timedelta
) -> ReviewSend | str:
    """Claims a pending request for sending (`sending`, one more attempt);
    the caller commits the claim before calling the API, so a crash after
    the API accepted leaves `sending`, never `pending`. A delivery that finds
    a claim older than `stale_after` cannot know whether it went out: it is
    marked failed (outcome unknown) rather than risk a second message; a
    younger claim is being sent right now. Otherwise returns the status."""
    request = session.get(ReviewRequest, request_id, with_for_update=True)
    if request is None:
        return "missing"
    if request.status == "sending":
        if request.claimed_at is not None and request.claimed_at > now - stale_after:
            return "sending"
        _outcome_unknown(request, "the sender stopped before recording whether the API accepted it")
        return OUTCOME_UNKNOWN
    if request.status != "pending" or not request.phone:
        return request.status
    order = session.get_one(Order, request.order_id)
    request.status = "sending"
    request.attempts += 1
    request.claimed_at = now
    return ReviewSend(request.id, request.phone, review_message(order))


def _outcome_unknown(request: ReviewRequest, why: str) -> None:
    request.status = "failed"
    request.last_error = f"outcome unknown: {why}"[:2000]


def mark_review_sent(session: Session, request_id: int, provider_message_id: str) -> str:
    """The API accepted the message. Also after a stale claim was given up
    as unknown meanwhile: now it is known."""
    request = session.get_one(ReviewRequest, request_id, with_for_update=True)
    if request.status in ("sending", "failed"):
        request.status = "sent"
        request.provider_message_id = provider_message_id[:64] or None
        request.sent_at = datetime.now(UTC)
    return request.status


def fail_stale_sends(session: Session, claimed_before: datetime) -> int:
    """Claims whose sender vanished and that no delivery came back to:
    failed, outcome unknown. Returns how many."""
    query = (
        select(ReviewRequest)
        .where(ReviewRequest.status == "sending", ReviewRequest.claimed_at < claimed_before)
        .with_for_update(skip_locked=True)
    )
    stale = list(session.scalars(query))
    for request in stale:
        _outcome_unknown(request, "the sender stopped before recording whether the API accepted it")
    return len(stale)


def record_send_failure(session: Session, request_id: int, error: MessagingError) -> None:
    """A claimed send the API refused (back to pending when waiting can help,
    failed when not) or left ambiguous (failed, outcome unknown)."""
    request = session.get(ReviewRequest, request_id, with_for_update=True)
    if request is None or request.status != "sending":
        return
    if error.ambiguous:
        _outcome_unknown(request, f"{type(error).__name__}: {error}")
        return
    request.last_error = f"{type(error).__name__}: {error}"[:2000]
    request.status = "pending" if error.retryable else "failed"


def give_up_review_request(session: Session, request_id: int) -> str:
    request = session.get(ReviewRequest, request_id, with_for_update=True)
    if request is None:
        return "missing"
    if request.status == "pending":
        request.status = "failed"
    return request.status
