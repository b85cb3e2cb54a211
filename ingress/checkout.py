"""POST /checkout: hold the stock, then start the payment at a provider.

Two short transactions around each provider call, never one long one: row
locks on products are not held while a provider answers, so checkouts of
the same SKU do not queue behind a slow network.

With `"provider": "auto"` (the default) the routing rules give the
providers in order; when one fails the next is asked, on the same order and
the same reservation (the payment row changes provider), so the stock is
reserved once whatever happens. When all fail, the reservation is released
and the order fails, as with a single provider."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import falcon
from prometheus_client import Counter, Gauge
from sqlalchemy.orm import Session, sessionmaker

from domain import carts, circuit, routing
from domain.circuit import CircuitPolicy
from domain.errors import Conflict, DomainError, InvalidRequest, ProviderError
from domain.gateways import PaymentProvider, ProviderFailure, StartedPayment, StartPayment
from domain.models import Order, Payment
from domain.order_bounds import OrderBounds
from domain.orders import PlaceOrder, abandon_checkout, place_order
from domain.routing import Route
from ingress.parsing import json_object, optional, required

log = logging.getLogger(__name__)

CHECKOUTS = Counter("payfleet_checkouts_total", "Checkouts answered", ["provider", "outcome"])
DECISIONS = Counter(
    "payfleet_routing_decisions_total",
    "Routing decisions at checkout: each provider asked or skipped, and how it went",
    ["rule", "provider", "outcome"],
)
CIRCUIT_OPEN = Gauge(
    "payfleet_provider_circuit_open",
    "1 while routing skips the provider after repeated failures (as this process last read it)",
    ["provider"],
    multiprocess_mode="livemostrecent",
)

AUTO = "auto"
# Seconds before each try to clean up after a provider that did not answer.
ABANDON_WAITS = (0.0, 2.0, 10.0, 60.0)


@dataclass(frozen=True)
class CheckoutCommand:
    order: PlaceOrder
    country: str | None


def parse_checkout(
    body: dict[str, Any], bounds: OrderBounds, providers: Mapping[str, PaymentProvider]
) -> CheckoutCommand:
    provider = AUTO if "provider" not in body else required(body, "provider", str)
    if provider != AUTO and provider not in providers:
        names = ", ".join(repr(name) for name in (AUTO, *sorted(providers)))
        raise InvalidRequest(f"provider {provider!r} is not supported; use one of {names}")
    currency = _code(required(body, "currency", str), 3, "currency")
    country = optional(body, "country", str)
    country = None if country is None else _code(country, 2, "country")
    if provider != AUTO:
        refusal = providers[provider].capabilities.refusal(currency, country, None)
        if refusal is not None:
            raise InvalidRequest(f"{provider} {refusal}", provider=provider)
    customer = optional(body, "customer", dict) or {}
    cart_id = optional(body, "cart_id", str)
    if (cart_id is None) == (body.get("items") is None):
        raise InvalidRequest("give either 'items' or 'cart_id'")
    order = PlaceOrder(
        lines=() if cart_id else _lines(required(body, "items", list), bounds),
        provider=provider,
        currency=currency,
        customer_email=optional(customer, "email", str),
        customer_phone=optional(customer, "phone", str),
        cart_id=cart_id,
    )
    return CheckoutCommand(order, country)


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


def _code(code: str, length: int, name: str) -> str:
    if len(code) != length or not (code.isascii() and code.isalpha()):
        kind = "3-letter ISO code" if length == 3 else "2-letter ISO country code"
        raise InvalidRequest(f"{name} must be a {kind}, got {code!r}")
    return code.upper()


class Router:
    """Routing as checkout and explain use it: the rules in force and the
    circuits open now, read in the caller's transaction."""

    def __init__(self, providers: Mapping[str, PaymentProvider], policy: CircuitPolicy) -> None:
        self.providers, self.policy = providers, policy

    def route(self, session: Session, currency: str, country: str | None, amount: int | None) -> Route:
        open_now = circuit.open_circuits(session)
        for name in self.providers:
            CIRCUIT_OPEN.labels(name).set(int(name in open_now))
        rules = routing.rules_in_force(session)
        return routing.resolve(
            rules, self.providers, open_now, currency=currency, country=country, amount=amount
        )

    def failed(self, sessions: sessionmaker[Session], provider: str) -> None:
        with sessions.begin() as session:
            opened = circuit.record_failure(session, provider, self.policy)
        if opened is not None:
            CIRCUIT_OPEN.labels(provider).set(1)

    def answered(self, session: Session, provider: str) -> None:
        circuit.record_success(session, provider)
        CIRCUIT_OPEN.labels(provider).set(0)


@dataclass(frozen=True)
class Tried:
    provider: str
    outcome: str  # started, or how it failed (timeout, server_error, ...)
    detail: str | None = None

    def as_json(self) -> dict[str, str]:
        shown = {"provider": self.provider, "outcome": self.outcome}
        return shown | ({"detail": self.detail} if self.detail else {})


def routing_answer(route: Route, tried: list[Tried]) -> dict[str, Any]:
    return {
        "rule": route.rule,
        "tried": [t.as_json() for t in tried],
        "skipped": [{"provider": name, "reason": reason} for name, reason in route.skipped],
    }


class Checkout:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        router: Router,
        payment_window: timedelta,
        max_body: int,
        bounds: OrderBounds,
    ) -> None:
        self._sessions, self._router = sessions, router
        self._window, self._max_body, self._bounds = payment_window, max_body, bounds

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        command = parse_checkout(json_object(req, self._max_body), self._bounds, self._router.providers)
        label = command.order.provider
        try:
            order, payment, route = self._place(command)
            attempt = _Attempt(self._sessions, self._router, order, payment, route)
            try:
                started = attempt.run(auto=command.order.provider == AUTO)
            finally:
                attempt.clean_up_unanswered()
        except DomainError as error:
            CHECKOUTS.labels(label, error.code).inc()
            raise
        CHECKOUTS.labels(payment.provider, "created").inc()
        resp.status = falcon.HTTP_201
        answer = {
            "order_id": str(order.id),
            "status": order.status,
            "expires_at": order.expires_at.isoformat(),
            "payment": {
                "provider": payment.provider,
                "provider_payment_id": payment.provider_payment_id,
                **started.for_customer,
            },
        }
        if command.order.provider == AUTO:
            answer["routing"] = routing_answer(route, attempt.tried)
        resp.media = answer

    def _place(self, command: CheckoutCommand) -> tuple[Order, Payment, Route]:
        chosen: list[Route] = []

        def choose(total: int) -> str:
            route = self._choose(session, command, total)
            chosen.append(route)
            return route.providers[0]

        with self._sessions.begin() as session:
            if command.order.cart_id is not None:
                # A cart filled before the bounds were lowered; the cart
                # stays locked until place_order has taken it.
                self._bounds.check(carts.lines_for_checkout(session, command.order.cart_id))
            order, payment = place_order(session, command.order, self._window, choose)
        return order, payment, chosen[0]

    def _choose(self, session: Session, command: CheckoutCommand, total: int) -> Route:
        currency, country = command.order.currency, command.country
        if command.order.provider != AUTO:
            provider = self._router.providers[command.order.provider]
            return routing.forced(provider, currency, country, total)
        route = self._router.route(session, currency, country, total)
        for name, _ in route.skipped:
            DECISIONS.labels(route.rule_label, name, "skipped").inc()
        if not route.providers:
            # Raised inside the order's transaction: nothing is reserved.
            skipped = "; ".join(f"{name} {reason}" for name, reason in route.skipped)
            raise ProviderError(
                f"no provider can take this payment ({skipped or 'no provider routed'})",
                routing=routing_answer(route, []),
            )
        return route


class _Attempt:
    """Asking the route's providers in turn for one order's payment."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        router: Router,
        order: Order,
        payment: Payment,
        route: Route,
    ) -> None:
        self._sessions, self._router, self._route = sessions, router, route
        self._order, self._payment = order, payment
        self._request = StartPayment(
            order_id=order.id,
            payment_id=payment.id,
            amount=payment.amount,
            currency=payment.currency,
            item_ref="+".join(line.sku for line in order.lines)[:100],
            phone=order.customer_phone,
            email=order.customer_email,
        )
        self.tried: list[Tried] = []
        self.unanswered: list[PaymentProvider] = []

    def run(self, *, auto: bool) -> StartedPayment:
        for position, name in enumerate(self._route.providers):
            if position and not self._switch_to(name):
                raise Conflict(f"order {self._order.id} moved on while its payment was being started")
            started = self._ask(self._router.providers[name])
            if started is not None:
                self._record_start(name, started, auto=auto)
                return started
        self._give_up()

    def _ask(self, provider: PaymentProvider) -> StartedPayment | None:
        try:
            started = provider.start(self._request)
        except ProviderError as error:
            outcome = error.outcome if isinstance(error, ProviderFailure) else "failed"
            self.tried.append(Tried(provider.name, outcome, error.detail))
            DECISIONS.labels(self._route.rule_label, provider.name, outcome).inc()
            self._router.failed(self._sessions, provider.name)
            if isinstance(error, ProviderFailure) and error.unanswered:
                self.unanswered.append(provider)
            return None
        self.tried.append(Tried(provider.name, "started"))
        DECISIONS.labels(self._route.rule_label, provider.name, "started").inc()
        return started

    def _switch_to(self, name: str) -> bool:
        last = self.tried[-1]
        with self._sessions.begin() as session:
            switched = routing.switch_provider(
                session, self._payment.id, name, f"{last.provider} failed ({last.detail})"
            )
        if switched:
            self._payment.provider, self._payment.provider_payment_id = name, None
        return switched

    def _record_start(self, name: str, started: StartedPayment, *, auto: bool) -> None:
        decision = _decision(self._route, self.tried) if auto else None
        with self._sessions.begin() as session:
            routing.record_start(session, self._payment.id, started.provider_payment_id, decision)
            # The provider answered: its circuit closes in the same transaction.
            self._router.answered(session, name)
        self._payment.provider_payment_id = started.provider_payment_id

    def _give_up(self) -> NoReturn:
        # Nothing stays reserved for a payment that never started.
        detail = "; ".join(t.detail or f"{t.provider} {t.outcome}" for t in self.tried)
        with self._sessions.begin() as session:
            abandon_checkout(session, self._order.id, f"payment could not start: {detail}")
        raise ProviderError(detail, routing=routing_answer(self._route, self.tried))

    def clean_up_unanswered(self) -> None:
        # Cleaning up after a provider that did not answer is no reason to
        # keep the customer waiting, and that provider may need a while to
        # come back: a thread of its own does it, whether or not another
        # provider then started the payment.
        if self.unanswered:
            threading.Thread(target=self._abandon_unanswered, name="abandon-unanswered", daemon=True).start()

    def _abandon_unanswered(self) -> None:
        """Make sure the providers that did not answer keep nothing open,
        trying again while they stay away. Past the last try, the weekly
        PaymentIntent sweep still cancels a Stripe intent left open (its
        metadata names our payment, which is no longer Stripe's)."""
        for provider in self.unanswered:
            for wait in ABANDON_WAITS:
                time.sleep(wait)
                try:
                    done = provider.abandon(self._request)
                except ProviderError as error:
                    log.warning("order %s: %s not cleaned up yet: %s", self._order.id, provider.name, error)
                    continue
                log.info("order %s: %s after its unanswered start: %s", self._order.id, provider.name, done)
                break


def _decision(route: Route, tried: list[Tried]) -> str:
    rule = f"rule {route.rule!r}" if route.rule else "default routing"
    steps = [f"{t.provider} {t.outcome}" + (f" ({t.detail})" if t.detail else "") for t in tried]
    skipped = [f"{name} skipped ({reason})" for name, reason in route.skipped]
    return f"routing: {rule}; " + "; ".join(skipped + steps)
