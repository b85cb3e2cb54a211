"""The sandbox process: Stripe's PaymentIntents API and Monetbil's widget and
check-payment on one address, and the customer's side of a payment as
`POST /sandbox/orders/{order_id}/{pay|fail|cancel|refund|trigger}`: each
settles the order's payment here and sends the provider's signed webhook to
the shop, as the provider would.

Routes of its own (JSON in and out; errors are {"error", "detail"}):
- `GET /sandbox`: what it is and where its webhooks go.
- `GET /sandbox/orders/{order_id}`: the order's payment as the sandbox holds it.
- `POST /sandbox/orders/{order_id}/pay|fail|cancel|refund`, body (optional)
  `{"duplicate": N, "delay": S, "provider": "stripe"|"monetbil"}`.
- `POST /sandbox/orders/{order_id}/trigger`, body `{"event": TYPE, …}`: any
  event the shop maps (a Stripe event type, or a Monetbil callback status),
  sent whatever the payment's state.
- `GET /sandbox/deliveries`: every webhook attempt, oldest first.

State is in memory: a restart forgets every payment.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from payfleet.sandbox import events
from payfleet.sandbox.loopback import LoopbackServer, Reply
from payfleet.sandbox.monetbil_api import MonetbilApi
from payfleet.sandbox.signing import stripe_signature
from payfleet.sandbox.stripe_api import StripeApi, is_live_key
from payfleet.sandbox.webhooks import RETRY_DELAYS, Attempt, Webhook, WebhookSender

SANDBOX_PREFIX = "/sandbox"
STRIPE_PREFIX = "/v1/"
MAX_DUPLICATES = 50
MAX_DELAY_SECONDS = 10.0
_ORDER_ROUTE = re.compile(r"^/sandbox/orders/([^/]+)(?:/([a-z]+))?$")


class SandboxRefused(Exception):
    """The sandbox will not run with these settings (a live key)."""


def refuse_live_keys(stripe_api_key: str) -> None:
    if is_live_key(stripe_api_key):
        raise SandboxRefused(
            "STRIPE_API_KEY is a live key (sk_live_…): the sandbox runs only with test keys or none; "
            "unset it to use the sandbox, or run the fleet without the sandbox to use Stripe"
        )


@dataclass(frozen=True)
class SandboxConfig:
    webhook_url: str  # the shop's (the ingress's) base address
    stripe_webhook_secret: str
    monetbil_service_key: str
    monetbil_service_secret: str
    retry_delays: tuple[float, ...] = RETRY_DELAYS


class ActionError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class Sandbox(LoopbackServer):
    thread_name = "sandbox"

    def __init__(self, config: SandboxConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.config = config
        self.stripe = StripeApi()
        self.monetbil = MonetbilApi(config.monetbil_service_key, config.monetbil_service_secret)
        self.sender = WebhookSender(config.retry_delays)
        # Actions one at a time, so their webhooks leave in the order asked.
        self._acting = threading.Lock()
        self._transactions: dict[str, str] = {}  # order id -> its current Monetbil transaction

    def start(self) -> Sandbox:
        super().start()
        self.monetbil.page_base = self.base_url
        self.monetbil.actions_url = f"{self.base_url}{SANDBOX_PREFIX}/orders"
        return self

    def stop(self) -> None:
        self.sender.stop()
        super().stop()

    # ---- HTTP

    def respond(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        route = urlsplit(path).path
        if route.startswith(STRIPE_PREFIX):
            return self.stripe.respond(method, path, headers, body)
        if route != SANDBOX_PREFIX and not route.startswith(SANDBOX_PREFIX + "/"):
            return self.monetbil.respond(method, path, headers, body)
        try:
            status, document = self._control(method.upper(), route, body)
        except ActionError as error:
            status, document = error.status, {"error": error.code, "detail": error.detail}
        payload = json.dumps(document, indent=2).encode("utf-8")
        return Reply(status, payload, {"Content-Type": "application/json"})

    def _control(self, method: str, route: str, body: bytes) -> tuple[int, Any]:
        if route in (SANDBOX_PREFIX, SANDBOX_PREFIX + "/") and method == "GET":
            return 200, self.describe()
        if route == SANDBOX_PREFIX + "/deliveries" and method == "GET":
            return 200, [asdict(attempt) for attempt in self.sender.attempts]
        found = _ORDER_ROUTE.match(route)
        if found and method == "GET" and found.group(2) is None:
            return 200, self.payment(found.group(1))
        if found and method == "POST" and found.group(2):
            return 200, self.act(found.group(1), found.group(2), **_options(body))
        raise ActionError(404, "not_found", f"no sandbox route {method} {route}")

    def describe(self) -> dict[str, Any]:
        return {
            "sandbox": "Stripe PaymentIntents and Monetbil widget v2.1 + check-payment; no real money moves",
            "stripe_api_base": self.base_url,
            "monetbil_api_base": self.base_url,
            "webhook_url": self.config.webhook_url,
            "actions": ["pay", "fail", "cancel", "refund", "trigger"],
        }

    # ---- the customer's side

    def payment(self, order_id: str, provider: str | None = None) -> dict[str, Any]:
        """The order's payment here: its provider and the provider's record."""
        intent = self.stripe.intent_for_order(order_id) if provider in (None, "stripe") else None
        if intent is not None:
            return {"order_id": order_id, "provider": "stripe", "payment_intent": intent}
        request = self.monetbil.payment_request(order_id) if provider in (None, "monetbil") else None
        if request is not None:
            current = self._transactions.get(order_id)
            transaction = self.monetbil.transaction(current) if current else None
            return {
                "order_id": order_id,
                "provider": "monetbil",
                "payment": request,
                "transaction": transaction,
            }
        raise ActionError(
            404, "unknown_order", f"no payment for order {order_id} was started in this sandbox"
        )

    def act(
        self,
        order_id: str,
        action: str,
        *,
        event: str | None = None,
        duplicate: int = 0,
        delay: float = 0.0,
        provider: str | None = None,
    ) -> dict[str, Any]:
        """Settle the order's payment as `action` says and deliver the
        provider's webhook, then `duplicate` more copies of it; `delay`
        seconds before each delivery."""
        if action not in ("pay", "fail", "cancel", "refund", "trigger"):
            raise ActionError(
                404, "unknown_action", f"no action {action!r}: pay, fail, cancel, refund or trigger"
            )
        if action == "trigger" and not event:
            raise ActionError(400, "bad_request", "trigger needs an event type")
        with self._acting:
            found = self.payment(order_id, provider)
            if found["provider"] == "stripe":
                name, hook = self._stripe(found["payment_intent"], action, event)
            else:
                name, hook = self._monetbil(order_id, found["payment"], action, event)
            deliveries: list[Attempt] = []
            for _ in range(1 + duplicate):
                time.sleep(delay)
                deliveries.append(self.sender.deliver(hook))
        return {
            **self.payment(order_id, found["provider"]),
            "event": name,
            "deliveries": [{**asdict(d), "delivered": d.delivered} for d in deliveries],
        }

    def _stripe(self, intent: dict[str, Any], action: str, event: str | None) -> tuple[str, Webhook]:
        event_type = event if action == "trigger" else events.STRIPE_ACTIONS[action]
        assert event_type is not None
        allowed = events.STRIPE_FROM.get(event_type)
        if allowed is None:
            raise ActionError(
                400,
                "unknown_event",
                f"{event_type!r} is not a Stripe event payfleet maps: {', '.join(events.STRIPE_FROM)}",
            )
        possible = intent["status"] in allowed
        if action != "trigger" and not possible:
            raise ActionError(
                409,
                "invalid_state",
                f"cannot {action} PaymentIntent {intent['id']}: its status is {intent['status']}",
            )
        obj = events.settle_intent(self.stripe, intent, event_type, move=possible)
        body = events.stripe_event(event_type, obj)
        secret = self.config.stripe_webhook_secret

        def headers() -> dict[str, str]:
            return {"Content-Type": "application/json", "Stripe-Signature": stripe_signature(body, secret)}

        url = f"{self.config.webhook_url}/webhooks/stripe"
        label = f"{event_type} {json.loads(body)['id']} ({intent['id']})"
        return event_type, Webhook("stripe", label, url, body, headers)

    def _monetbil(
        self, order_id: str, request: dict[str, str], action: str, event: str | None
    ) -> tuple[str, Webhook]:
        if action == "refund":
            raise ActionError(409, "not_supported", "Monetbil sends no refund callback: refund by hand")
        status = event if action == "trigger" else events.MONETBIL_ACTIONS[action]
        assert status is not None
        if status not in events.MONETBIL_STATUSES:
            raise ActionError(
                400,
                "unknown_event",
                f"{status!r} is not a Monetbil status payfleet maps: {', '.join(events.MONETBIL_STATUSES)}",
            )
        current = self._transactions.get(order_id)
        settled = self.monetbil.transaction(current) if current else None
        if action != "trigger" and settled is not None and settled["status"] == 1:
            raise ActionError(409, "invalid_state", f"cannot {action} order {order_id}: it is paid")
        # A settled transaction is over: the customer's next try is a new one.
        # A trigger reuses it, to send late or repeated callbacks, and leaves
        # what check-payment says of it as it was.
        reuse = current if action == "trigger" or settled is None else None
        form = self.monetbil.pay(order_id, status=status, transaction_id=reuse)
        if reuse is not None and settled is not None:
            self.monetbil.set_transaction(reuse, settled["status"])
        self._transactions[order_id] = form["transaction_id"]
        url = request.get("notify_url") or f"{self.config.webhook_url}/webhooks/monetbil"
        label = f"{status} {form['transaction_id']}"
        body = urlencode(form).encode()
        return status, Webhook(
            "monetbil", label, url, body, lambda: {"Content-Type": "application/x-www-form-urlencoded"}
        )


def _options(body: bytes) -> dict[str, Any]:
    """The action's options from its JSON body (may be empty)."""
    try:
        given = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise ActionError(400, "bad_request", "the body must be a JSON object") from None
    if not isinstance(given, dict):
        raise ActionError(400, "bad_request", "the body must be a JSON object")
    unknown = set(given) - {"event", "duplicate", "delay", "provider"}
    if unknown:
        raise ActionError(400, "bad_request", f"unknown fields: {', '.join(sorted(unknown))}")
    duplicate, delay = given.get("duplicate", 0), given.get("delay", 0)
    if type(duplicate) is not int or not 0 <= duplicate <= MAX_DUPLICATES:
        raise ActionError(400, "bad_request", f"duplicate must be an integer from 0 to {MAX_DUPLICATES}")
    if type(delay) not in (int, float) or not 0 <= delay <= MAX_DELAY_SECONDS:
        raise ActionError(400, "bad_request", f"delay must be seconds from 0 to {MAX_DELAY_SECONDS:g}")
    event, provider = given.get("event"), given.get("provider")
    if event is not None and not isinstance(event, str):
        raise ActionError(400, "bad_request", "event must be a string")
    if provider not in (None, "stripe", "monetbil"):
        raise ActionError(400, "bad_request", "provider must be stripe or monetbil")
    return {"event": event, "duplicate": duplicate, "delay": float(delay), "provider": provider}
