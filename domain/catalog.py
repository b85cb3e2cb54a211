"""Products and what the operator sees of them, orders and events."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from domain import stock
from domain.errors import Conflict, InvalidRequest, NotFound
from domain.models import (
    EVENT_STATUSES,
    ORDER_STATUSES,
    PROVIDERS,
    Order,
    OrderTransition,
    Payment,
    Product,
    ProviderEvent,
    StockMovement,
    StockReservation,
)


@dataclass(frozen=True)
class PutProduct:
    sku: str
    name: str
    price: int
    currency: str
    on_hand: int
    low_stock_threshold: int = 0


def put_product(session: Session, command: PutProduct) -> tuple[dict[str, Any], bool]:
    """Create or update a SKU; returns (view, created). A change of on_hand
    writes a restock or adjustment movement."""
    # Insert-if-missing first so that the row exists to be locked: two first
    # PUTs of one SKU then serialise on that lock instead of racing.
    created = (
        session.execute(
            insert(Product)
            .values(
                sku=command.sku,
                name=command.name,
                price=command.price,
                currency=command.currency,
                on_hand=0,
                reserved=0,
                low_stock_threshold=command.low_stock_threshold,
            )
            .on_conflict_do_nothing(index_elements=["sku"])
            .returning(Product.sku)
        ).first()
        is not None
    )
    product = session.get_one(Product, command.sku, with_for_update=True, populate_existing=True)
    if command.on_hand < product.reserved:
        raise Conflict(
            f"on_hand {command.on_hand} is below the {product.reserved} units reserved",
            sku=command.sku,
            reserved=product.reserved,
        )
    product.name = command.name
    product.price = command.price
    product.currency = command.currency
    product.low_stock_threshold = command.low_stock_threshold
    product.updated_at = datetime.now(UTC)
    stock.set_on_hand(session, command.sku, command.on_hand, "set by admin")
    stock.track_low_stock(session, [command.sku])  # the threshold may have moved
    session.refresh(product)
    return product_view(product), created


def get_product(session: Session, sku: str) -> dict[str, Any]:
    product = session.get(Product, sku)
    if product is None:
        raise NotFound(f"no product {sku!r}", sku=sku)
    return product_view(product)


def product_view(product: Product) -> dict[str, Any]:
    available = product.on_hand - product.reserved
    return {
        "sku": product.sku,
        "name": product.name,
        "price": product.price,
        "currency": product.currency,
        "on_hand": product.on_hand,
        "reserved": product.reserved,
        "available": available,
        "low_stock_threshold": product.low_stock_threshold,
        "low_stock": available <= product.low_stock_threshold,
    }


def order_view(session: Session, order_id: str) -> dict[str, Any]:
    try:
        key = uuid.UUID(order_id)
    except ValueError:
        raise NotFound(f"no order {order_id!r}") from None
    order = session.get(Order, key)
    if order is None:
        raise NotFound(f"no order {order_id!r}")
    payment = session.scalars(select(Payment).where(Payment.order_id == key)).first()
    return {
        "id": str(order.id),
        "status": order.status,
        "currency": order.currency,
        "total_amount": order.total_amount,
        "customer": {"email": order.customer_email, "phone": order.customer_phone},
        "created_at": _iso(order.created_at),
        "expires_at": _iso(order.expires_at),
        "payment": _payment_view(payment) if payment else None,
        "lines": [
            {"sku": line.sku, "quantity": line.quantity, "unit_price": line.unit_price}
            for line in order.lines
        ],
        "timeline": _timeline(session, order, payment),
    }


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
    if payment is not None:
        for e in session.scalars(select(ProviderEvent).where(ProviderEvent.payment_id == payment.id)):
            entries.append(
                (e.received_at, 0, e.id, {"at": _iso(e.received_at), "kind": "event", **event_view(e)})
            )
    for t in session.scalars(select(OrderTransition).where(OrderTransition.order_id == order.id)):
        view = {
            "at": _iso(t.created_at),
            "kind": "transition",
            "subject": t.subject,
            "from": t.from_status,
            "to": t.to_status,
            "reason": t.reason,
            "event_id": t.event_id,
        }
        entries.append((t.created_at, 1, t.id, view))
    for m in session.scalars(select(StockMovement).where(StockMovement.reference == str(order.id))):
        entries.append(
            (m.created_at, 2, m.id, {"at": _iso(m.created_at), "kind": "movement", **_movement_view(m)})
        )
    return [view for *_, view in sorted(entries, key=lambda entry: entry[:3])]


def _movement_view(m: StockMovement) -> dict[str, Any]:
    return {
        "sku": m.sku,
        "type": m.type,
        "quantity": m.quantity,
        "before": m.on_hand_before,
        "after": m.on_hand_after,
        "reason": m.reason,
        "reference": m.reference,
    }


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
        "received_at": _iso(event.received_at),
        "published_at": _iso(event.published_at),
        "processed_at": _iso(event.processed_at),
    }


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


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def list_products(session: Session, *, low_stock: bool | None, limit: int) -> list[dict[str, Any]]:
    query = select(Product).order_by(Product.sku).limit(limit)
    if low_stock is not None:
        is_low = Product.on_hand - Product.reserved <= Product.low_stock_threshold
        query = query.where(is_low if low_stock else ~is_low)
    return [product_view(p) for p in session.scalars(query)]


def movements(session: Session, sku: str, *, limit: int, before: int | None) -> dict[str, Any]:
    """A SKU's ledger, newest first, a page at a time (`before` is the last id
    of the previous page)."""
    get_product(session, sku)
    query = select(StockMovement).where(StockMovement.sku == sku).order_by(StockMovement.id.desc())
    if before is not None:
        query = query.where(StockMovement.id < before)
    page = list(session.scalars(query.limit(limit + 1)))
    more = len(page) > limit
    page = page[:limit]
    return {
        "movements": [{"id": m.id, "at": _iso(m.created_at), **_movement_view(m)} for m in page],
        "next_before": page[-1].id if more else None,
    }


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
            "created_at": _iso(o.created_at),
            "updated_at": _iso(o.updated_at),
        }
        for o in session.scalars(query)
    ]
