"""Carts: baskets that reserve nothing and expire a TTL after their last
change. Checkout consumes a cart once, in the order's own transaction."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from domain.errors import Conflict, Gone, InvalidRequest, NotFound, UnknownSku
from domain.models import Cart, CartItem, Product
from domain.order_bounds import OrderBounds


def create_cart(session: Session, ttl: timedelta) -> Cart:
    now = datetime.now(UTC)
    cart = Cart(id=uuid.uuid4(), created_at=now, updated_at=now, expires_at=now + ttl)
    session.add(cart)
    session.flush()
    return cart


def set_item(
    session: Session, cart_id: str, sku: str, quantity: int, ttl: timedelta, bounds: OrderBounds
) -> Cart:
    """Set one line's quantity (0 removes it); every change extends the cart.
    A cart is an order in waiting: a change that grows it past the order
    bounds is refused (one that shrinks it never is)."""
    cart = _open_cart(session, cart_id)
    if session.get(Product, sku) is None:
        raise UnknownSku(f"unknown SKU {sku!r}", sku=sku)
    line = next((item for item in cart.items if item.sku == sku), None)
    if quantity > (line.quantity if line else 0):
        bounds.check(_lines_with(cart, sku, quantity))
    if quantity == 0 and line is not None:
        cart.items.remove(line)
    elif quantity > 0 and line is None:
        cart.items.append(CartItem(cart_id=cart.id, sku=sku, quantity=quantity))
    elif line is not None:
        line.quantity = quantity
    now = datetime.now(UTC)
    cart.updated_at, cart.expires_at = now, now + ttl
    session.flush()
    return cart


def _lines_with(cart: Cart, sku: str, quantity: int) -> tuple[tuple[str, int], ...]:
    lines = {item.sku: item.quantity for item in cart.items}
    lines[sku] = quantity
    return tuple(lines.items())


def lines_for_checkout(session: Session, cart_id: str) -> tuple[tuple[str, int], ...]:
    """The cart's lines, the cart locked until the checkout's transaction
    ends, so two checkouts of one cart cannot both take it."""
    cart = _open_cart(session, cart_id)
    if not cart.items:
        raise InvalidRequest("the cart is empty")
    return tuple((item.sku, item.quantity) for item in cart.items)


def check_out(session: Session, cart_id: str, order_id: uuid.UUID) -> None:
    cart = _cart(session, cart_id, lock=True)
    cart.order_id, cart.checked_out_at = order_id, datetime.now(UTC)


def cart_view(session: Session, cart_id: str) -> dict[str, Any]:
    cart = _cart(session, cart_id, lock=False)
    prices = {
        p.sku: p for p in session.scalars(select(Product).where(Product.sku.in_([i.sku for i in cart.items])))
    }
    lines = [
        {
            "sku": item.sku,
            "quantity": item.quantity,
            "unit_price": prices[item.sku].price,
            "currency": prices[item.sku].currency,
        }
        for item in cart.items
    ]
    return {
        "id": str(cart.id),
        "items": lines,
        "expires_at": cart.expires_at.isoformat(),
        "expired": cart.expires_at <= datetime.now(UTC),
        "order_id": str(cart.order_id) if cart.order_id else None,
    }


def _open_cart(session: Session, cart_id: str) -> Cart:
    cart = _cart(session, cart_id, lock=True)
    if cart.order_id is not None:
        raise Conflict(f"cart {cart_id} was checked out already", order_id=str(cart.order_id))
    if cart.expires_at <= datetime.now(UTC):
        raise Gone(f"cart {cart_id} expired at {cart.expires_at.isoformat()}")
    return cart


def _cart(session: Session, cart_id: str, *, lock: bool) -> Cart:
    try:
        key = uuid.UUID(cart_id)
    except ValueError:
        raise NotFound(f"no cart {cart_id!r}") from None
    cart = session.get(Cart, key, with_for_update=lock)
    if cart is None:
        raise NotFound(f"no cart {cart_id!r}")
    return cart


def release_from(session: Session, order_id: uuid.UUID) -> None:
    """The order a cart became never started its payment: the cart is the
    customer's again, to check out once more."""
    session.execute(update(Cart).where(Cart.order_id == order_id).values(order_id=None, checked_out_at=None))


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
