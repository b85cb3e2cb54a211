"""Provider events: stored once, applied once.

Storing is idempotent through the unique `(provider, event_key)`; applying
locks the event row and writes its processed mark in the same transaction as
its effects, so a redelivered message finds the mark and does nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from domain.errors import Conflict, InvalidRequest, NotFound, PaymentNotFound
from domain.models import Payment, ProviderEvent
from domain.orders import apply_payment_status


@dataclass(frozen=True)
class EventFacts:
    """What ingress extracts from a verified event before storing it."""

    provider: str
    event_key: str
    event_type: str
    provider_payment_id: str | None
    payload: dict[str, Any]


def record_event(session: Session, facts: EventFacts) -> tuple[int, bool]:
    """Store an event; returns (id, duplicate). Two racing deliveries of one
    event both succeed here: ON CONFLICT makes the loser a duplicate instead
    of an IntegrityError."""
    inserted = session.execute(
        insert(ProviderEvent)
        .values(
            provider=facts.provider,
            event_key=facts.event_key,
            event_type=facts.event_type,
            provider_payment_id=facts.provider_payment_id,
            payload=facts.payload,
            status="received",
            attempts=0,
        )
        .on_conflict_do_nothing(index_elements=["provider", "event_key"])
        .returning(ProviderEvent.id)
    ).scalar()
    if inserted is not None:
        return inserted, False
    existing = session.execute(
        select(ProviderEvent.id).where(
            ProviderEvent.provider == facts.provider, ProviderEvent.event_key == facts.event_key
        )
    ).scalar_one()
    return existing, True


def mark_published(session: Session, event_ids: list[int]) -> None:
    session.execute(
        update(ProviderEvent).where(ProviderEvent.id.in_(event_ids)).values(published_at=datetime.now(UTC))
    )


# --- Stripe -----------------------------------------------------------------


def _intent_id(obj: dict[str, Any]) -> str | None:
    return obj.get("id") if obj.get("object") == "payment_intent" else obj.get("payment_intent")


def stripe_event_facts(event: Any) -> EventFacts:
    """Check the shape of a (verified) Stripe event and pull out its keys."""
    if not isinstance(event, dict):
        raise InvalidRequest("event must be a JSON object")
    event_id, event_type, data = event.get("id"), event.get("type"), event.get("data")
    if not isinstance(event_id, str) or not event_id or not isinstance(event_type, str) or not event_type:
        raise InvalidRequest("event needs a string id and type")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise InvalidRequest("event needs data.object")
    intent = _intent_id(data["object"])
    return EventFacts("stripe", event_id, event_type, intent if isinstance(intent, str) else None, event)


def _charge_refunded(obj: dict[str, Any]) -> str | None:
    # Stripe sends charge.refunded for partial refunds too; only a full refund
    # moves the payment, a partial one is stored and marked ignored.
    return "refunded" if obj.get("refunded") is True else None


def _always(status: str) -> Callable[[dict[str, Any]], str | None]:
    return lambda obj: status


STRIPE_HANDLERS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "payment_intent.succeeded": _always("succeeded"),
    "payment_intent.payment_failed": _always("failed"),
    "payment_intent.canceled": _always("canceled"),
    "payment_intent.processing": _always("processing"),
    "charge.refunded": _charge_refunded,
}

HANDLERS = {"stripe": STRIPE_HANDLERS}


def target_status(event: ProviderEvent) -> str | None:
    handler = HANDLERS.get(event.provider, {}).get(event.event_type)
    return handler(event.payload["data"]["object"]) if handler else None


# --- applying -----------------------------------------------------------------


def apply_event(session: Session, event_id: int) -> str:
    """Apply a stored event to its payment, once. Returns the event's status
    afterwards; raises PaymentNotFound (retryable) when its payment is unknown."""
    event = session.get(ProviderEvent, event_id, with_for_update=True)
    if event is None:
        return "missing"
    if event.status != "received":
        return event.status
    event.attempts += 1
    target = target_status(event)
    if target is None:
        return _settle(event, "ignored")
    payment = _find_payment(session, event)
    if payment is None:
        raise PaymentNotFound(
            f"no {event.provider} payment {event.provider_payment_id!r} for event {event.id}"
        )
    event.payment_id = payment.id
    reason = f"{event.provider} {event.event_type}"
    apply_payment_status(session, payment, target, reason=reason, event_id=event.id)
    return _settle(event, "processed")


def _settle(event: ProviderEvent, status: str, error: str | None = None) -> str:
    event.status = status
    event.processed_at = datetime.now(UTC)
    if error is not None:
        event.last_error = error
    return status


def _find_payment(session: Session, event: ProviderEvent) -> Payment | None:
    query = select(Payment).where(Payment.provider == event.provider).with_for_update()
    if event.provider_payment_id:
        found = session.scalars(query.where(Payment.provider_payment_id == event.provider_payment_id)).first()
        if found is not None:
            return found
    # The webhook can beat the checkout's last commit (the one that stores the
    # PaymentIntent id); the intent's metadata names our payment directly.
    metadata = event.payload["data"]["object"].get("metadata") or {}
    try:
        payment_id = uuid.UUID(str(metadata.get("payment_id")))
    except ValueError:
        return None
    return session.scalars(query.where(Payment.id == payment_id)).first()


def record_failed_attempt(session: Session, event_id: int, error: BaseException) -> None:
    session.execute(
        update(ProviderEvent)
        .where(ProviderEvent.id == event_id, ProviderEvent.status == "received")
        .values(attempts=ProviderEvent.attempts + 1, last_error=f"{type(error).__name__}: {error}"[:2000])
    )


def give_up(session: Session, event_id: int) -> str:
    """Retries are exhausted: settle the event as unmatched (its payment never
    appeared) or failed, keeping its last error for the operator."""
    event = session.get(ProviderEvent, event_id, with_for_update=True)
    if event is None or event.status != "received":
        return event.status if event else "missing"
    unmatched = (event.last_error or "").startswith(PaymentNotFound.__name__)
    return _settle(event, "unmatched" if unmatched else "failed")


def lock_unpublished(session: Session, *, grace: timedelta, stuck_after: timedelta, limit: int) -> list[int]:
    """Events the relay must (re)publish, locked so two schedulers split them:
    never published and older than `grace` (the ingress that stored them is
    not about to publish them itself), or published so long ago and still
    unprocessed that their message must have been lost."""
    now = datetime.now(UTC)
    never = (ProviderEvent.published_at.is_(None)) & (ProviderEvent.received_at < now - grace)
    lost = ProviderEvent.published_at < now - stuck_after
    query = (
        select(ProviderEvent.id)
        .where(ProviderEvent.status == "received", never | lost)
        .order_by(ProviderEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(query))


REPLAYABLE = ("unmatched", "failed", "ignored")


def reopen(session: Session, event_id: int) -> ProviderEvent:
    """Make a settled-but-not-applied event applicable again (an operator's
    replay). A processed event is never reopened: it was applied once."""
    event = session.get(ProviderEvent, event_id, with_for_update=True)
    if event is None:
        raise NotFound(f"no event {event_id}")
    if event.status == "received":
        return event
    if event.status not in REPLAYABLE:
        raise Conflict(
            f"event {event_id} is {event.status}; only {', '.join(REPLAYABLE)} events are replayed"
        )
    event.status, event.processed_at, event.published_at = "received", None, None
    return event
