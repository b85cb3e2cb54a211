"""POST /checkout: hold the stock, then start the payment at the provider.

Two short transactions around the provider call, never one long one: row
locks on products are not held while Stripe answers, so checkouts of the same
SKU do not queue behind a slow network."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import falcon
from prometheus_client import Counter
from sqlalchemy.orm import Session, sessionmaker

from domain import carts
from domain.errors import DomainError, InvalidRequest, ProviderError
from domain.gateways import MonetbilGateway, StripeGateway
from domain.models import Order, Payment
from domain.order_bounds import OrderBounds
from domain.orders import PlaceOrder, abandon_checkout, attach_provider_payment, place_order
from ingress.parsing import json_object, optional, required

CHECKOUTS = Counter("payfleet_checkouts_total", "Checkouts answered", ["provider", "outcome"])


# Monetbil is paid in currencies without minor units, so the amount in minor
# units is also the amount Monetbil expects.
MONETBIL_CURRENCIES = frozenset({"XAF", "XOF"})


def parse_checkout(body: dict[str, Any], bounds: OrderBounds) -> PlaceOrder:
    provider = required(body, "provider", str)
    if provider not in ("stripe", "monetbil"):
        raise InvalidRequest(f"provider {provider!r} is not supported; use 'stripe' or 'monetbil'")
    currency = _currency(required(body, "currency", str))
    if provider == "monetbil" and currency not in MONETBIL_CURRENCIES:
        raise InvalidRequest(f"Monetbil takes {', '.join(sorted(MONETBIL_CURRENCIES))}, not {currency}")
    customer = optional(body, "customer", dict) or {}
    cart_id = optional(body, "cart_id", str)
    if (cart_id is None) == (body.get("items") is None):
        raise InvalidRequest("give either 'items' or 'cart_id'")
    return PlaceOrder(
        lines=() if cart_id else _lines(required(body, "items", list), bounds),
        provider=provider,
        currency=currency,
        customer_email=optional(customer, "email", str),
        customer_phone=optional(customer, "phone", str),
        cart_id=cart_id,
    )


def _lines(items: list[Any], bounds: OrderBounds) -> tuple[tuple[str, int], ...]:
    if not items:
        raise InvalidRequest("'items' must hold at least one line")
    # Every item is at least one unit: more items than the unit bound are
    # refused before any is read.
    bounds.check_units(len(items))
    quantities: dict[str, int] = {}
    for item in items:
        if not isinstance(item, dict):
            raise InvalidRequest("each item must be an object with 'sku' and 'quantity'")
        sku, quantity = required(item, "sku", str), required(item, "quantity", int)
        if not sku or len(sku) > 64 or quantity <= 0:
            raise InvalidRequest("bad item: sku must be 1-64 characters, quantity at least 1")
        quantities[sku] = quantities.get(sku, 0) + quantity  # repeated SKUs are one line
    lines = tuple(quantities.items())
    bounds.check(lines)
    return lines


def _currency(code: str) -> str:
    if len(code) != 3 or not (code.isascii() and code.isalpha()):
        raise InvalidRequest(f"currency must be a 3-letter ISO code, got {code!r}")
    return code.upper()


@dataclass(frozen=True)
class MonetbilLinks:
    """Where Monetbil sends the callback and the customer afterwards."""

    notify_url: str
    return_url: str


class Checkout:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        stripe: StripeGateway,
        monetbil: MonetbilGateway,
        links: MonetbilLinks,
        payment_window: timedelta,
        max_body: int,
        bounds: OrderBounds,
    ) -> None:
        self._sessions, self._stripe, self._monetbil, self._links = sessions, stripe, monetbil, links
        self._window, self._max_body, self._bounds = payment_window, max_body, bounds
        self._starters: dict[str, Callable[[Order, Payment], dict[str, Any]]] = {
            "stripe": self._start_stripe,
            "monetbil": self._start_monetbil,
        }

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        command = parse_checkout(json_object(req, self._max_body), self._bounds)
        try:
            with self._sessions.begin() as session:
                if command.cart_id is not None:
                    # A cart filled before the bounds were lowered; the cart
                    # stays locked until place_order has taken it.
                    self._bounds.check(carts.lines_for_checkout(session, command.cart_id))
                order, payment = place_order(session, command, self._window)
            started = self._start_payment(order, payment)
        except DomainError as error:
            CHECKOUTS.labels(command.provider, error.code).inc()
            raise
        CHECKOUTS.labels(command.provider, "created").inc()
        resp.status = falcon.HTTP_201
        resp.media = {
            "order_id": str(order.id),
            "status": order.status,
            "expires_at": order.expires_at.isoformat(),
            "payment": {
                "provider": payment.provider,
                "provider_payment_id": payment.provider_payment_id,
                **started,
            },
        }

    def _start_payment(self, order: Order, payment: Payment) -> dict[str, Any]:
        try:
            return self._starters[payment.provider](order, payment)
        except ProviderError as error:
            # Nothing stays reserved for a payment that never started.
            with self._sessions.begin() as session:
                abandon_checkout(session, order.id, f"payment could not start: {error.detail}")
            raise

    def _start_stripe(self, order: Order, payment: Payment) -> dict[str, Any]:
        intent = self._stripe.create_payment_intent(
            amount=payment.amount,
            currency=payment.currency,
            metadata={"order_id": str(order.id), "payment_id": str(payment.id)},
            # Deterministic: a retried call can never create a second intent.
            idempotency_key=f"payfleet-checkout-{payment.id}",
        )
        with self._sessions.begin() as session:
            attach_provider_payment(session, payment.id, intent.id)
        payment.provider_payment_id = intent.id
        return {"client_secret": intent.client_secret}

    def _start_monetbil(self, order: Order, payment: Payment) -> dict[str, Any]:
        # Monetbil names no transaction until the customer pays; the callback
        # finds the payment by payment_ref, our order id.
        url = self._monetbil.start_payment(
            amount=payment.amount,
            currency=payment.currency,
            payment_ref=str(order.id),
            item_ref="+".join(line.sku for line in order.lines)[:100],
            notify_url=self._links.notify_url,
            return_url=self._links.return_url,
            phone=order.customer_phone,
            email=order.customer_email,
        )
        return {"payment_url": url}
