"""What the operator reads: orders with their timelines, stored events,
and the reservations currently held. Nothing here changes a row."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from domain.errors import InvalidRequest, NotFound
from domain.models import (
    EVENT_STATUSES,
    ORDER_STATUSES,
    PROVIDERS,
    Order,
    OrderTransition,
    Payment,
    ProviderEvent,
    ReviewRequest,
    StockMovement,
    StockReservation,
)
from domain.products import iso, movement_view


def order_view(session: Session, order_id: str) -> dict[str, Any]:
    try:
        key = uuid.UUID(order_id)
    except ValueError:
        raise NotFound(f"no order {order_id!r}") from None
    order = session.get(Order, key)
    if order is None:
        raise NotFound(f"no order {order_id!r}")
    payment = session.scalars(select(Payment).where(Payment.order_id == key)).first()
    timeline = _timeline(session, order, payment)
    return {
        "id": str(order.id),
        "status": order.status,
        "currency": order.currency,
        "total_amount": order.total_amount,
        "customer": {"email": order.customer_email, "phone": order.customer_phone},
        "created_at": iso(order.created_at),
        "expires_at": iso(order.expires_at),
        "payment": _payment_view(payment) if payment else None,
        "lines": [
            {"sku": line.sku, "quantity": line.quantity, "unit_price": line.unit_price}
            for line in order.lines
        ],
        "timeline": timeline,
        "trace_ids": _trace_ids(session, order, timeline),
    }


def _trace_ids(session: Session, order: Order, timeline: list[dict[str, Any]]) -> list[str]:
    """The trace ids of the work that touched the order, oldest first: its
    events' (each found in the logs of the ingress, the worker and the
    provider calls) and the review request run's."""
    found = [entry["trace_id"] for entry in timeline if entry.get("trace_id")]
    review = session.scalar(select(ReviewRequest.trace_id).where(ReviewRequest.order_id == order.id))
    return list(dict.fromkeys([*found, *([review] if review else [])]))


def _payment_view(payment: Payment) -> dict[str, Any]:
    return {
        "id": str(payment.id),
        "provider": payment.provider,
        "provider_payment_id": payment.provider_payment_id,
        "status": payment.status,
        "amount": payment.amount,
        "currency": payment.currency,
    }


def _timeline(session: Session, order: Order, payment: Payment | None) -> list[dict[str, Any]]:
    """Events, transitions and movements, oldest first. Ties (one transaction
    shares one timestamp) keep the event first, then table order."""
    entries: list[tuple[datetime, int, int, dict[str, Any]]] = []
    traces: dict[int, str | None] = {}
    if payment is not None:
        for e in session.scalars(select(ProviderEvent).where(ProviderEvent.payment_id == payment.id)):
            traces[e.id] = e.trace_id
            entries.append(
                (e.received_at, 0, e.id, {"at": iso(e.received_at), "kind": "event", **event_view(e)})
            )
    for t in session.scalars(select(OrderTransition).where(OrderTransition.order_id == order.id)):
        view = {
            "at": iso(t.created_at),
            "kind": "transition",
            "subject": t.subject,
            "from": t.from_status,
            "to": t.to_status,
            "reason": t.reason,
            "event_id": t.event_id,
            # The trace of the event that made the change, when one did.
            "trace_id": traces.get(t.event_id) if t.event_id is not None else None,
        }
        entries.append((t.created_at, 1, t.id, view))
    for m in session.scalars(select(StockMovement).where(StockMovement.reference == str(order.id))):
        entries.append(
            (m.created_at, 2, m.id, {"at": iso(m.created_at), "kind": "movement", **movement_view(m)})
        )
    return [view for *_, view in sorted(entries, key=lambda entry: entry[:3])]


def event_view(event: ProviderEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "provider": event.provider,
        "event_key": event.event_key,
        "type": event.event_type,
        "status": event.status,
        "provider_payment_id": event.provider_payment_id,
        "attempts": event.attempts,
        "last_error": event.last_error,
        "received_at": iso(event.received_at),
        "published_at": iso(event.published_at),
        "processed_at": iso(event.processed_at),
        "trace_id": event.trace_id,
    }


def get_event(session: Session, event_id: int) -> dict[str, Any]:
    """One stored event and the payment it was applied to."""
    event = session.get(ProviderEvent, event_id)
    if event is None:
        raise NotFound(f"no event {event_id}")
    return {**event_view(event), "payment_id": str(event.payment_id) if event.payment_id else None}


def list_events(
    session: Session, *, provider: str | None, status: str | None, limit: int
) -> list[dict[str, Any]]:
    if provider is not None and provider not in PROVIDERS:
        raise InvalidRequest(f"unknown provider {provider!r}")
    query = select(ProviderEvent).order_by(ProviderEvent.id.desc()).limit(limit)
    if provider is not None:
        query = query.where(ProviderEvent.provider == provider)
    if status is not None:
        if status not in EVENT_STATUSES:
            raise InvalidRequest(f"unknown event status {status!r}")
        query = query.where(ProviderEvent.status == status)
    return [event_view(e) for e in session.scalars(query)]


def reservation_stats(session: Session) -> dict[str, Any]:
    rows = session.execute(
        select(
            StockReservation.sku,
            func.count(),
            func.sum(StockReservation.quantity),
            func.min(StockReservation.created_at),
        )
        .where(StockReservation.status == "active")
        .group_by(StockReservation.sku)
        .order_by(StockReservation.sku)
    ).all()
    oldest = min((row[3] for row in rows), default=None)
    return {
        "active_reservations": sum(int(row[1]) for row in rows),
        "units_reserved": {sku: int(units) for sku, _, units, _ in rows},
        "oldest_active_age_seconds": (datetime.now(UTC) - oldest).total_seconds() if oldest else None,
    }


def list_orders(session: Session, *, status: str | None, limit: int) -> list[dict[str, Any]]:
    query = select(Order).order_by(Order.created_at.desc()).limit(limit)
    if status is not None:
        if status not in ORDER_STATUSES:
            raise InvalidRequest(f"unknown order status {status!r}")
        query = query.where(Order.status == status)
    return [
        {
            "id": str(o.id),
            "status": o.status,
            "total_amount": o.total_amount,
            "currency": o.currency,
            "created_at": iso(o.created_at),
            "updated_at": iso(o.updated_at),
        }
        for o in session.scalars(query)
    ]
