"""Payment provider gateways: the small surface the rules need from a
provider, and the adapter that speaks it through the official library.
Every base address is configurable, so tests point the real library at a
local fake server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import requests
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

    def __init__(
        self,
        api_key: str,
        api_base: str,
        *,
        timeout: float = 10.0,
        max_retries: int = 2,
        http_client: stripe.HTTPClient | None = None,
    ) -> None:
        self._secrets = _Secrets(api_key, api_base)
        self._client = stripe.StripeClient(
            api_key or "sk_unconfigured",
            base_addresses={"api": api_base},
            http_client=http_client or stripe.RequestsClient(timeout=timeout),
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

    def list_payment_intents(self, *, created_gte: int) -> Iterator[PaymentIntent]:
        """Every PaymentIntent created at or after `created_gte` (Unix time),
        newest first; the library fetches the pages as they are consumed."""
        if not self._configured:
            raise ProviderError("Stripe is not configured (STRIPE_API_KEY is empty)")
        params: dict[str, Any] = {"created": {"gte": created_gte}, "limit": 100}
        try:
            for intent in self._client.v1.payment_intents.list(params=params).auto_paging_iter():  # type: ignore[arg-type]
                yield PaymentIntent(
                    id=intent.id,
                    status=intent.status,
                    amount=intent.amount,
                    currency=intent.currency,
                    metadata=intent.metadata.to_dict() if intent.metadata else {},
                )
        except stripe.StripeError as error:
            raise self._failure(error) from None

    def _call(self, request: Any) -> PaymentIntent:
        if not self._configured:
            raise ProviderError("Stripe is not configured (STRIPE_API_KEY is empty)")
        try:
            intent = request()
        except stripe.StripeError as error:
            raise self._failure(error) from None
        return PaymentIntent(
            id=intent.id,
            status=intent.status,
            amount=intent.amount,
            currency=intent.currency,
            client_secret=intent.client_secret,
            metadata=intent.metadata.to_dict() if intent.metadata else {},
        )

    def _failure(self, error: stripe.StripeError) -> ProviderError:
        """What failed, for the 502 and the order's timeline: never the API
        key, nor the base address the library names in network errors."""
        return ProviderError(
            self._secrets.scrub(f"Stripe {_stripe_failure(error)}"), provider_code=error.code
        )


def _stripe_failure(error: stripe.StripeError) -> str:
    if isinstance(error, stripe.APIConnectionError):
        return _network_failure(error.__cause__)
    if isinstance(error, (stripe.AuthenticationError, stripe.PermissionError)):
        # Stripe's text here quotes part of the key; the status says enough.
        return f"refused payfleet's API key (HTTP {error.http_status})"
    status = f"HTTP {error.http_status}" if error.http_status else type(error).__name__
    message = error.user_message or ""
    return f"answered {status}: {message}" if message else f"answered {status}"


# Monetbil's check-payment transaction status, as our payment status.
MONETBIL_CHECK_STATUSES = {1: "succeeded", 0: "failed", -1: "canceled"}


@dataclass(frozen=True)
class MonetbilCheck:
    """A transaction as Monetbil's check-payment API reports it."""

    status: str
    amount: int | None = None
    currency: str | None = None

    def covers(self, amount: int, currency: str) -> bool:
        """A success for exactly this amount and currency: a genuine payment
        of 1 XAF that names another order's payment_ref pays nothing."""
        return (
            self.status == "succeeded" and self.amount == amount and (self.currency or "").upper() == currency
        )


class MonetbilGateway(Protocol):
    def start_payment(
        self,
        *,
        amount: int,
        currency: str,
        payment_ref: str,
        item_ref: str,
        notify_url: str,
        return_url: str,
        phone: str | None,
        email: str | None,
    ) -> str: ...

    def check_transaction(self, transaction_id: str) -> MonetbilCheck: ...


class MonetbilApiGateway:
    """Monetbil's widget API v2.1 and check-payment API over HTTP. Transport
    failures, HTTP errors and refusals all become ProviderError."""

    def __init__(self, service_key: str, api_base: str, *, timeout: float = 10.0) -> None:
        self._service_key, self._base, self._timeout = service_key, api_base.rstrip("/"), timeout
        self._secrets = _Secrets(service_key, self._base)
        self._http = requests.Session()

    def start_payment(
        self,
        *,
        amount: int,
        currency: str,
        payment_ref: str,
        item_ref: str,
        notify_url: str,
        return_url: str,
        phone: str | None,
        email: str | None,
    ) -> str:
        """Returns the payment URL the customer is sent to."""
        form = {
            "amount": str(amount),
            "currency": currency,
            "payment_ref": payment_ref,
            "item_ref": item_ref,
            "notify_url": notify_url,
            "return_url": return_url,
            "phone": phone or "",
            "email": email or "",
        }
        answer = self._post("starting the payment", f"/widget/v2.1/{self._service_key}", form)
        url = answer.get("payment_url")
        if answer.get("success") is not True or not isinstance(url, str):
            reason = answer.get("message") or "no reason given"
            raise ProviderError(self._secrets.scrub(f"Monetbil refused the payment: {reason}"))
        return url

    def check_transaction(self, transaction_id: str) -> MonetbilCheck:
        """The transaction by Monetbil's own word; a transaction Monetbil does
        not know (yet) is `pending`, never a success."""
        answer = self._post("checking the payment", "/payment/v1/checkPayment", {"paymentId": transaction_id})
        transaction = answer.get("transaction")
        if not isinstance(transaction, dict):
            return MonetbilCheck("pending")
        try:
            status = MONETBIL_CHECK_STATUSES.get(int(str(transaction.get("status"))), "pending")
        except ValueError:
            return MonetbilCheck("pending")
        return MonetbilCheck(status, _whole(transaction.get("amount")), transaction.get("currency"))

    def _post(self, action: str, path: str, form: dict[str, str]) -> dict[str, Any]:
        if not self._service_key:
            raise ProviderError("Monetbil is not configured (MONETBIL_SERVICE_KEY is empty)")
        try:
            response = self._http.post(f"{self._base}{path}", data=form, timeout=self._timeout)
        except requests.RequestException as error:
            raise self._failure(action, _network_failure(error)) from None
        if response.status_code >= 400:
            raise self._failure(action, f"answered HTTP {response.status_code}")
        try:
            answer = response.json()
        except ValueError:
            raise self._failure(
                action, f"answered HTTP {response.status_code} with a body that is not JSON"
            ) from None
        if not isinstance(answer, dict):
            raise self._failure(action, "answered JSON that is not an object")
        return answer

    def _failure(self, action: str, what: str) -> ProviderError:
        # requests names the URL, and the widget URL's path is the service
        # key: the detail says which call failed and how, never where.
        return ProviderError(self._secrets.scrub(f"Monetbil {what} ({action})"))


def _network_failure(error: BaseException | None) -> str:
    """The kind of transport failure, in words that name no host or URL."""
    if isinstance(error, requests.Timeout):
        return "timed out"
    text = str(error)
    if "Connection refused" in text:
        return "refused the connection"
    if "Name or service not known" in text or "NameResolutionError" in text:
        return "could not be resolved"
    if isinstance(error, requests.ConnectionError):
        return "could not be reached"
    return f"could not be reached ({type(error).__name__})"


@dataclass(frozen=True)
class _Secrets:
    """What a provider's failure text must never carry into an answer or a
    stored reason: the credential and the configured base address. Scrubbing
    is the last guard; the details above are built without either."""

    credential: str
    base: str

    def scrub(self, text: str) -> str:
        base = self.base.rstrip("/")
        for secret, stand_in in ((self.credential, "[key]"), (base, "[provider]")):
            if secret:
                text = text.replace(secret, stand_in)
        return text


def _whole(value: Any) -> int | None:
    """An amount as Monetbil writes it (1000, "1000", "1000.00"), if whole."""
    try:
        number = float(str(value))
    except ValueError:
        return None
    return int(number) if number.is_integer() else None
