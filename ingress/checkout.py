"""POST /checkout: hold the stock, then start the payment at the provider.

Two short transactions around the provider call, never one long one: row
locks on products are not held while Stripe answers, so checkouts of the same
SKU do not queue behind a slow network."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import falcon
from prometheus_client import Counter
from sqlalchemy.orm import Session, sessionmaker

from domain.errors import DomainError, InvalidRequest, ProviderError
from domain.gateways import StripeGateway
from domain.models import Order, Payment
from domain.orders import PlaceOrder, abandon_checkout, attach_provider_payment, place_order
from ingress.parsing import json_object, optional, required

CHECKOUTS = Counter("payfleet_checkouts_total", "Checkouts answered", ["provider", "outcome"])

MAX_LINES = 100
MAX_QUANTITY = 10_000


def parse_checkout(body: dict[str, Any]) -> PlaceOrder:
    items = required(body, "items", list)
    if not items or len(items) > MAX_LINES:
        raise InvalidRequest(f"'items' must hold 1 to {MAX_LINES} lines")
    quantities: dict[str, int] = {}
    for item in items:
        if not isinstance(item, dict):
            raise InvalidRequest("each item must be an object with 'sku' and 'quantity'")
        sku, quantity = required(item, "sku", str), required(item, "quantity", int)
        if not sku or len(sku) > 64 or not 0 < quantity <= MAX_QUANTITY:
            raise InvalidRequest(f"bad item: sku must be 1-64 characters, quantity 1-{MAX_QUANTITY}")
        quantities[sku] = quantities.get(sku, 0) + quantity  # repeated SKUs are one line
    provider = required(body, "provider", str)
    if provider != "stripe":
        raise InvalidRequest(f"provider {provider!r} is not supported; use 'stripe'")
    customer = optional(body, "customer", dict) or {}
    return PlaceOrder(
        lines=tuple(quantities.items()),
        provider=provider,
        currency=_currency(required(body, "currency", str)),
        customer_email=optional(customer, "email", str),
        customer_phone=optional(customer, "phone", str),
    )


def _currency(code: str) -> str:
    if len(code) != 3 or not code.isalpha():
        raise InvalidRequest(f"currency must be a 3-letter ISO code, got {code!r}")
    return code.upper()


class Checkout:
    def __init__(
        self, sessions: sessionmaker[Session], stripe: StripeGateway, payment_window: timedelta, max_body: int
    ) -> None:
        self._sessions, self._stripe = sessions, stripe
        self._window, self._max_body = payment_window, max_body

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        command = parse_checkout(json_object(req, self._max_body))
        try:
            with self._sessions() as session:
                order, payment = place_order(session, command, self._window)
                session.commit()
            client_secret = self._start_payment(order, payment)
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
                "client_secret": client_secret,
            },
        }

    def _start_payment(self, order: Order, payment: Payment) -> str | None:
        try:
            intent = self._stripe.create_payment_intent(
                amount=payment.amount,
                currency=payment.currency,
                metadata={"order_id": str(order.id), "payment_id": str(payment.id)},
                # Deterministic: a retried call can never create a second intent.
                idempotency_key=f"payfleet-checkout-{payment.id}",
            )
        except ProviderError as error:
            with self._sessions() as session:
                abandon_checkout(session, order.id, f"payment could not start: {error.detail}")
                session.commit()
            raise
        with self._sessions() as session:
            attach_provider_payment(session, payment.id, intent.id)
            session.commit()
        payment.provider_payment_id = intent.id
        return intent.client_secret
