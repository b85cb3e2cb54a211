"""request-reviews: one WhatsApp review request per completed order, ever,
and the state machine of sending it (pending → sending → sent | failed).

A send is claimed (`sending`, committed) before the API call, so a crash
after the API accepted is never sent twice. Functions never commit.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import exists, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from domain.messaging import MessagingError
from domain.models import Order, ReviewRequest

REVIEW_AFTER = timedelta(days=7)
# Orders older than this are not asked any more (a request weeks late is
# noise). Far wider than a day: a run that was skipped or failed, or a day
# the clocks change, leaves no order unasked; the next run takes them.
REVIEW_UNTIL = timedelta(days=14)


def request_reviews(
    session: Session,
    reference: datetime,
    run_id: int | None,
    *,
    limit: int = 500,
    trace_id: str | None = None,
) -> tuple[Counter[str], list[int]]:
    """Records one review request for up to `limit` orders completed at
    least 7 (and less than 14) days before `reference` that have none. The
    unique order_id makes this once per order, ever: a later run, or a
    racing replica, inserts nothing. Returns the counts and the ids of the
    requests to send. The requests keep the run's `trace_id`."""
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
    return _insert_requests(session, rows, run_id, trace_id)


def _insert_requests(
    session: Session, order_ids: list[uuid.UUID], run_id: int | None, trace_id: str | None
) -> tuple[Counter[str], list[int]]:
    counts: Counter[str] = Counter()
    to_send: list[int] = []
    for order in session.scalars(select(Order).where(Order.id.in_(order_ids))):
        phone = (order.customer_phone or "").strip() or None
        status = "pending" if phone else "skipped"
        inserted = session.execute(
            insert(ReviewRequest)
            .values(
                order_id=order.id, run_id=run_id, phone=phone, status=status, attempts=0, trace_id=trace_id
            )
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


def unsent_review_requests(
    session: Session, older_than: datetime, *, limit: int = 500
) -> dict[int, str | None]:
    """Pending requests whose message may have been lost (never attempted):
    {id: the trace id of the run that recorded it}."""
    query = (
        select(ReviewRequest.id, ReviewRequest.trace_id)
        .where(
            ReviewRequest.status == "pending",
            ReviewRequest.attempts == 0,
            ReviewRequest.created_at < older_than,
        )
        .order_by(ReviewRequest.id)
        .limit(limit)
    )
    return {request_id: trace_id for request_id, trace_id in session.execute(query)}


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
    """Its retries are exhausted: a request still waiting to be sent is
    failed, and says so, before the API's last refusal (kept by
    record_send_failure) or that no attempt reached the API at all."""
    request = session.get(ReviewRequest, request_id, with_for_update=True)
    if request is None:
        return "missing"
    if request.status == "pending":
        request.status = "failed"
        last = request.last_error or "no attempt reached the messaging API"
        request.last_error = f"gave up after {request.attempts} attempts; last: {last}"[:2000]
    return request.status


def reopen_failed(session: Session, request_id: int) -> str | None:
    """A failed request made sendable again (`pending`): its dead-lettered
    message was requeued by an operator, who has fixed the cause. A send
    whose outcome is unknown may have reached the customer and is never
    reopened: one message per order, ever, outweighs a missed review.
    Returns None, or why the request is left as it is."""
    request = session.get(ReviewRequest, request_id, with_for_update=True)
    if request is None:
        return f"no review request {request_id}"
    if request.status == "pending":
        return None
    if request.status == "failed" and (request.last_error or "").startswith("outcome unknown"):
        return f"review request {request_id} may already have been sent (outcome unknown); never sent twice"
    if request.status != "failed":
        return f"review request {request_id} is {request.status}; only a failed request is sent again"
    request.status, request.claimed_at = "pending", None
    return None
