"""Payment provider gateways: the small surface the rules need from a
provider, and the adapter that speaks it through the official library.
Every base address is configurable, so tests point the real library at a
local fake server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, Protocol

import requests
import stripe

from domain.errors import ProviderError


class ProviderFailure(ProviderError):
    """A provider call that failed, and how (`outcome`): routing falls back on
    any of them, and an unanswered call (`timeout`, `unreachable`) may have
    created something at the provider that must be abandoned."""

    def __init__(self, detail: str, outcome: str, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.outcome = outcome

    @property
    def unanswered(self) -> bool:
        return self.outcome in ("timeout", "unreachable")


# Every provider call names the trace id of the work it is made for (an
# event's, a job run's) in this header, so the provider's request logs (and
# the tests' fakes) tie it to payfleet's log lines. Bound per thread of work
# by the process that does the work (workers.main), like the log context.
TRACE_HEADER = "X-Payfleet-Trace-Id"
_calls_trace: ContextVar[str | None] = ContextVar("payfleet_calls_trace", default=None)


def trace_calls(trace_id: str | None) -> Token[str | None]:
    """Provider calls made from here on (in this context) carry `trace_id`;
    give the token to `untrace_calls` when the work is done."""
    return _calls_trace.set(trace_id)


def untrace_calls(token: Token[str | None]) -> None:
    _calls_trace.reset(token)


def trace_headers() -> dict[str, str]:
    trace_id = _calls_trace.get()
    return {TRACE_HEADER: trace_id} if trace_id else {}


def _outcome_of_status(status: int | None) -> str:
    if status is None:
        return "failed"
    return "server_error" if status >= 500 else "refused"


@dataclass(frozen=True)
class PaymentIntent:
    id: str
    status: str
    amount: int
    currency: str
    client_secret: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def _intent(intent: Any) -> PaymentIntent:
    """Ours, from the library's PaymentIntent (a call's answer or a list's item)."""
    return PaymentIntent(
        id=intent.id,
        status=intent.status,
        amount=intent.amount,
        currency=intent.currency,
        client_secret=getattr(intent, "client_secret", None),  # absent where an answer leaves it out
        metadata=intent.metadata.to_dict() if intent.metadata else {},
    )


class StripeGateway(Protocol):
    def create_payment_intent(
        self, *, amount: int, currency: str, metadata: dict[str, str], idempotency_key: str
    ) -> PaymentIntent: ...

    def retrieve_payment_intent(self, intent_id: str) -> PaymentIntent: ...

    def cancel_payment_intent(
        self, intent_id: str, *, reason: str, idempotency_key: str
    ) -> PaymentIntent: ...

    @property
    def configured(self) -> bool: ...


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

    @property
    def configured(self) -> bool:
        return self._configured

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
                options=_stripe_options(idempotency_key),
            )
        )

    def retrieve_payment_intent(self, intent_id: str) -> PaymentIntent:
        return self._call(
            lambda: self._client.v1.payment_intents.retrieve(intent_id, options=_stripe_options())
        )

    def cancel_payment_intent(self, intent_id: str, *, reason: str, idempotency_key: str) -> PaymentIntent:
        return self._call(
            lambda: self._client.v1.payment_intents.cancel(
                intent_id,
                params={"cancellation_reason": reason},
                options=_stripe_options(idempotency_key),
            )
        )

    def list_payment_intents(self, *, created_gte: int) -> Iterator[PaymentIntent]:
        """Every PaymentIntent created at or after `created_gte` (Unix time),
        newest first; the pages are fetched as they are consumed."""
        return self._list({"created": {"gte": created_gte}, "limit": 100})

    def list_payment_intents_after(self, intent_id: str) -> Iterator[PaymentIntent]:
        """The PaymentIntents created after `intent_id`, oldest first (paged
        backwards from it as they are consumed)."""
        return self._list({"ending_before": intent_id, "limit": 100})

    def _list(self, params: dict[str, Any]) -> Iterator[PaymentIntent]:
        if not self._configured:
            raise ProviderFailure("Stripe is not configured (STRIPE_API_KEY is empty)", "unconfigured")
        # Paged here, not by the library's auto-paging, which fetches later
        # pages without the call's options: each page's request carries the
        # trace header. Onward from a page's last item, or, with
        # `ending_before`, backwards from its first, each such page (newest
        # first, as Stripe sends it) read oldest first, as the library does.
        backwards = "ending_before" in params
        try:
            while True:
                page = self._client.v1.payment_intents.list(params=params, options=_stripe_options())  # type: ignore[arg-type]
                for intent in reversed(page.data) if backwards else page.data:
                    yield _intent(intent)
                if not page.has_more or not page.data:
                    return
                if backwards:
                    params = {**params, "ending_before": page.data[0].id}
                else:
                    params = {**params, "starting_after": page.data[-1].id}
        except stripe.StripeError as error:
            raise self._failure(error) from None

    def _call(self, request: Any) -> PaymentIntent:
        if not self._configured:
            raise ProviderFailure("Stripe is not configured (STRIPE_API_KEY is empty)", "unconfigured")
        try:
            intent = request()
        except stripe.StripeError as error:
            raise self._failure(error) from None
        return _intent(intent)

    def _failure(self, error: stripe.StripeError) -> ProviderFailure:
        """What failed, for the 502 and the order's timeline: never the API
        key, nor the base address the library names in network errors."""
        if isinstance(error, stripe.APIConnectionError):
            outcome = _network_outcome(error.__cause__)
        else:
            outcome = _outcome_of_status(error.http_status)
        return ProviderFailure(
            self._secrets.scrub(f"Stripe {_stripe_failure(error)}"), outcome, provider_code=error.code
        )


def _stripe_options(idempotency_key: str | None = None) -> stripe.RequestOptions:
    """A call's options: its idempotency key and the trace header."""
    options: stripe.RequestOptions = {"headers": trace_headers()}
    if idempotency_key is not None:
        options["idempotency_key"] = idempotency_key
    return options


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

    @property
    def configured(self) -> bool: ...


class MonetbilApiGateway:
    """Monetbil's widget API v2.1 and check-payment API over HTTP. Transport
    failures, HTTP errors and refusals all become ProviderError."""

    def __init__(self, service_key: str, api_base: str, *, timeout: float = 10.0) -> None:
        self._service_key, self._base, self._timeout = service_key, api_base.rstrip("/"), timeout
        self._secrets = _Secrets(service_key, self._base)
        self._http = requests.Session()

    @property
    def configured(self) -> bool:
        return bool(self._service_key)

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
            raise ProviderFailure(self._secrets.scrub(f"Monetbil refused the payment: {reason}"), "refused")
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
            raise ProviderFailure(
                "Monetbil is not configured (MONETBIL_SERVICE_KEY is empty)", "unconfigured"
            )
        try:
            response = self._http.post(
                f"{self._base}{path}", data=form, headers=trace_headers(), timeout=self._timeout
            )
        except requests.RequestException as error:
            raise self._failure(action, _network_failure(error), _network_outcome(error)) from None
        if response.status_code >= 400:
            raise self._failure(
                action, f"answered HTTP {response.status_code}", _outcome_of_status(response.status_code)
            )
        try:
            answer = response.json()
        except ValueError:
            raise self._failure(
                action, f"answered HTTP {response.status_code} with a body that is not JSON"
            ) from None
        if not isinstance(answer, dict):
            raise self._failure(action, "answered JSON that is not an object")
        return answer

    def _failure(self, action: str, what: str, outcome: str = "failed") -> ProviderFailure:
        # requests names the URL, and the widget URL's path is the service
        # key: the detail says which call failed and how, never where.
        return ProviderFailure(self._secrets.scrub(f"Monetbil {what} ({action})"), outcome)


def _network_outcome(error: BaseException | None) -> str:
    """A refused connection reached nothing; any other transport failure
    may have been carried out without our hearing back."""
    if isinstance(error, requests.Timeout):
        return "timeout"
    return "connection_refused" if "Connection refused" in str(error) else "unreachable"


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


# --- the payment provider contract (routing) -------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What a provider can take. Amounts in minor units; no countries means
    any country."""

    currencies: frozenset[str]
    countries: frozenset[str] | None = None
    min_amount: int = 1
    max_amount: int | None = None

    def refusal(self, currency: str, country: str | None, amount: int | None) -> str | None:
        """Why this provider cannot take such a payment, or None if it can.
        An unknown country or amount (explain without them) is not held
        against it."""
        if currency not in self.currencies:
            return f"does not take {currency}"
        if country is not None and self.countries is not None and country not in self.countries:
            return f"does not take payments from {country}"
        if amount is not None and amount < self.min_amount:
            return f"takes at least {self.min_amount} minor units, not {amount}"
        if amount is not None and self.max_amount is not None and amount > self.max_amount:
            return f"takes at most {self.max_amount} minor units, not {amount}"
        return None


@dataclass(frozen=True)
class StartPayment:
    """What any provider needs to start an order's payment."""

    order_id: uuid.UUID
    payment_id: uuid.UUID
    amount: int
    currency: str
    item_ref: str
    phone: str | None
    email: str | None


@dataclass(frozen=True)
class StartedPayment:
    provider_payment_id: str | None
    # What the customer's client needs next: a client_secret or a payment_url.
    for_customer: dict[str, str | None]


class PaymentProvider(Protocol):
    """One payment provider as checkout and routing see it. A new provider is
    one module implementing this, and one line in `payment_providers`."""

    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> Capabilities: ...

    def health(self) -> str | None:
        """Why the provider cannot be asked at all (not configured), or None."""
        ...

    def start(self, request: StartPayment) -> StartedPayment:
        """Start the payment; ProviderFailure when the provider failed or refused."""
        ...

    def abandon(self, request: StartPayment) -> str:
        """After a start that went unanswered (it may have been carried out),
        make sure nothing stays open at the provider; says what it did."""
        ...


# Stripe's presentment currencies. XAF and XOF, like JPY, are zero-decimal
# there, as in ISO 4217: an amount in our minor units is Stripe's amount.
_STRIPE_CURRENCY_LIST = """
USD AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BIF BMD BND BOB BRL BSD BWP BYN BZD
CAD CDF CHF CLP CNY COP CRC CVE CZK DJF DKK DOP DZD EGP ETB EUR FJD FKP GBP GEL GIP GMD GNF GTQ
GYD HKD HNL HTG HUF IDR ILS INR ISK JMD JPY KES KGS KHR KMF KRW KYD KZT LAK LBP LKR LRD LSL MAD
MDL MGA MKD MMK MNT MOP MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN
PYG QAR RON RSD RUB RWF SAR SBD SCR SEK SGD SHP SLE SOS SRD STD SZL THB TJS TOP TRY TTD TWD TZS
UAH UGX UYU UZS VND VUV WST XAF XCD XOF XPF YER ZAR ZMW
"""
STRIPE_CURRENCIES = frozenset(_STRIPE_CURRENCY_LIST.split())
STRIPE_MAX_AMOUNT = 99_999_999  # Stripe's largest amount: eight digits

# Monetbil is paid in currencies without minor units, so the amount in minor
# units is also the amount Monetbil expects; it serves the countries whose
# money they are (CEMAC for XAF, UEMOA for XOF).
MONETBIL_CURRENCIES = frozenset({"XAF", "XOF"})
MONETBIL_COUNTRIES = frozenset(
    {"CM", "CF", "TD", "CG", "GQ", "GA", "BJ", "BF", "CI", "GW", "ML", "NE", "SN", "TG"}
)


class StripeProvider:
    name = "stripe"
    capabilities = Capabilities(STRIPE_CURRENCIES, max_amount=STRIPE_MAX_AMOUNT)

    def __init__(self, stripe: StripeGateway) -> None:
        self._stripe = stripe

    def health(self) -> str | None:
        return None if self._stripe.configured else "not configured (STRIPE_API_KEY is empty)"

    def start(self, request: StartPayment) -> StartedPayment:
        intent = self._create(request)
        return StartedPayment(intent.id, {"client_secret": intent.client_secret})

    def abandon(self, request: StartPayment) -> str:
        # Asking again with the same idempotency key and parameters answers
        # the intent the unanswered call created, without creating another
        # (or creates one when the first never ran); either way it is then
        # cancelled, so nothing the customer never saw stays open.
        intent = self._create(request)
        if intent.status in ("succeeded", "canceled"):
            return f"PaymentIntent {intent.id} was already {intent.status}"
        self._stripe.cancel_payment_intent(
            intent.id, reason="abandoned", idempotency_key=f"payfleet-abandon-{request.payment_id}"
        )
        return f"PaymentIntent {intent.id} cancelled"

    def _create(self, request: StartPayment) -> PaymentIntent:
        return self._stripe.create_payment_intent(
            amount=request.amount,
            currency=request.currency,
            metadata={"order_id": str(request.order_id), "payment_id": str(request.payment_id)},
            # Deterministic: a retried call can never create a second intent.
            idempotency_key=f"payfleet-checkout-{request.payment_id}",
        )


@dataclass(frozen=True)
class MonetbilLinks:
    """Where Monetbil sends the callback and the customer afterwards."""

    notify_url: str
    return_url: str


class MonetbilProvider:
    name = "monetbil"
    capabilities = Capabilities(MONETBIL_CURRENCIES, MONETBIL_COUNTRIES)

    def __init__(self, monetbil: MonetbilGateway, links: MonetbilLinks) -> None:
        self._monetbil, self._links = monetbil, links

    def health(self) -> str | None:
        return None if self._monetbil.configured else "not configured (MONETBIL_SERVICE_KEY is empty)"

    def start(self, request: StartPayment) -> StartedPayment:
        # Monetbil names no transaction until the customer pays; the callback
        # finds the payment by payment_ref, our order id.
        url = self._monetbil.start_payment(
            amount=request.amount,
            currency=request.currency,
            payment_ref=str(request.order_id),
            item_ref=request.item_ref,
            notify_url=self._links.notify_url,
            return_url=self._links.return_url,
            phone=request.phone,
            email=request.email,
        )
        return StartedPayment(None, {"payment_url": url})

    def abandon(self, request: StartPayment) -> str:
        # A widget session is only a page the customer was never sent to;
        # Monetbil has nothing to cancel.
        return "nothing to cancel at Monetbil (its payment page was never shown)"


def payment_providers(
    stripe: StripeGateway, monetbil: MonetbilGateway, links: MonetbilLinks
) -> dict[str, PaymentProvider]:
    """Every provider checkout can route to, by name: one line each."""
    providers: list[PaymentProvider] = [
        StripeProvider(stripe),
        MonetbilProvider(monetbil, links),
    ]
    return {provider.name: provider for provider in providers}
