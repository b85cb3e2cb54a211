"""Payment provider gateways: the small surface the rules need from a
provider, and the adapter that speaks it through the official library.
Every base address is configurable, so tests point the real library at a
local fake server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import stripe

from domain.errors import ProviderError


@dataclass(frozen=True)
class PaymentIntent:
    id: str
    status: str
    amount: int
    currency: str
    client_secret: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class StripeGateway(Protocol):
    def create_payment_intent(
        self, *, amount: int, currency: str, metadata: dict[str, str], idempotency_key: str
    ) -> PaymentIntent: ...

    def retrieve_payment_intent(self, intent_id: str) -> PaymentIntent: ...

    def cancel_payment_intent(
        self, intent_id: str, *, reason: str, idempotency_key: str
    ) -> PaymentIntent: ...


class StripeApiGateway:
    """Stripe through `stripe.StripeClient`. Library errors are turned into
    ProviderError where they arrive, so callers handle one family."""

    def __init__(self, api_key: str, api_base: str, *, timeout: float = 10.0, max_retries: int = 2) -> None:
        self._client = stripe.StripeClient(
            api_key or "sk_unconfigured",
            base_addresses={"api": api_base},
            http_client=stripe.RequestsClient(timeout=timeout),
            max_network_retries=max_retries,
        )
        self._configured = bool(api_key)

    def create_payment_intent(
        self, *, amount: int, currency: str, metadata: dict[str, str], idempotency_key: str
    ) -> PaymentIntent:
        params: dict[str, Any] = {
            "amount": amount,
            "currency": currency.lower(),
            "metadata": metadata,
            "automatic_payment_methods": {"enabled": True},
        }
        return self._call(
            lambda: self._client.v1.payment_intents.create(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": idempotency_key},
            )
        )

    def retrieve_payment_intent(self, intent_id: str) -> PaymentIntent:
        return self._call(lambda: self._client.v1.payment_intents.retrieve(intent_id))

    def cancel_payment_intent(self, intent_id: str, *, reason: str, idempotency_key: str) -> PaymentIntent:
        return self._call(
            lambda: self._client.v1.payment_intents.cancel(
                intent_id,
                params={"cancellation_reason": reason},
                options={"idempotency_key": idempotency_key},
            )
        )

    def _call(self, request: Any) -> PaymentIntent:
        if not self._configured:
            raise ProviderError("Stripe is not configured (STRIPE_API_KEY is empty)")
        try:
            intent = request()
        except stripe.StripeError as error:
            raise ProviderError(f"Stripe: {error.user_message or error}", provider_code=error.code) from None
        return PaymentIntent(
            id=intent.id,
            status=intent.status,
            amount=intent.amount,
            currency=intent.currency,
            client_secret=intent.client_secret,
            metadata=intent.metadata.to_dict() if intent.metadata else {},
        )
