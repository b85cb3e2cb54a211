"""Products: creating and changing them (a change of `on_hand` is a ledger
movement), and what the operator sees of them and of their ledger."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from domain import stock
from domain.errors import Conflict, NotFound
from domain.models import (
    Product,
    StockMovement,
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
    stock.track_low_stock(session, command.sku)  # on_hand or the threshold may have moved
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


def movement_view(m: StockMovement) -> dict[str, Any]:
    return {
        "sku": m.sku,
        "type": m.type,
        "quantity": m.quantity,
        "before": m.on_hand_before,
        "after": m.on_hand_after,
        "reason": m.reason,
        "reference": m.reference,
    }


def iso(moment: datetime | None) -> str | None:
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
        "movements": [{"id": m.id, "at": iso(m.created_at), **movement_view(m)} for m in page],
        "next_before": page[-1].id if more else None,
    }
