"""What the sandbox does at a provider when the customer pays, fails, cancels
or is refunded, and the webhook the provider then sends: Stripe events (the
PaymentIntent moved first, so a retrieve agrees with the event) and Monetbil
callbacks (check-payment set first, so the ingress's confirmation agrees)."""

from __future__ import annotations

import json
import secrets
import string
import time
from typing import Any

import stripe

from payfleet.sandbox.stripe_api import CANCELABLE_STATUSES, StripeApi

# The customer's actions, as the event each provider sends for them.
STRIPE_ACTIONS = {
    "pay": "payment_intent.succeeded",
    "fail": "payment_intent.payment_failed",
    "cancel": "payment_intent.canceled",
    "refund": "charge.refunded",
}
MONETBIL_ACTIONS = {"pay": "success", "fail": "failed", "cancel": "cancelled"}

# Where each Stripe event may come from, as Stripe allows it (a trigger skips
# the check: out-of-order and impossible events are what it is for).
STRIPE_FROM = {
    "payment_intent.succeeded": CANCELABLE_STATUSES,
    "payment_intent.payment_failed": CANCELABLE_STATUSES,
    "payment_intent.canceled": CANCELABLE_STATUSES,
    "payment_intent.processing": CANCELABLE_STATUSES,
    "charge.refunded": frozenset({"succeeded"}),
}
MONETBIL_STATUSES = (
    "success",
    "successful",
    "completed",
    "failed",
    "failure",
    "error",
    "pending",
    "processing",
    "cancelled",
    "canceled",
)
DECLINED = {
    "type": "card_error",
    "code": "card_declined",
    "decline_code": "generic_decline",
    "message": "Your card was declined.",
}
_ALNUM = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(24))


# What each PaymentIntent event says the intent became.
_INTENT_CHANGES: dict[str, tuple[str, dict[str, Any]]] = {
    "payment_intent.succeeded": ("succeeded", {"payment_method": "pm_card_visa", "last_payment_error": None}),
    "payment_intent.payment_failed": ("requires_payment_method", {"last_payment_error": DECLINED}),
    "payment_intent.canceled": ("canceled", {"cancellation_reason": "requested_by_customer"}),
    "payment_intent.processing": ("processing", {}),
}


def settle_intent(api: StripeApi, intent: dict[str, Any], event_type: str, *, move: bool) -> dict[str, Any]:
    """The event's data.object. With `move`, the intent becomes what the
    event says first (so a retrieve agrees); without, the event carries a
    snapshot that was never true now: a late or impossible event, which
    leaves Stripe's record as it is."""
    charge = intent.get("latest_charge") or new_id("ch_")
    if event_type == "charge.refunded":
        return _refunded_charge(intent, charge)
    status, fields = _INTENT_CHANGES[event_type]
    fields = {**fields, "latest_charge": charge} if status != "canceled" else fields
    if move:
        return api.set_status(intent["id"], status, **fields)
    return {**intent, **fields, "status": status}


def _refunded_charge(intent: dict[str, Any], charge: str) -> dict[str, Any]:
    return {
        "id": charge,
        "object": "charge",
        "amount": intent["amount"],
        "amount_captured": intent["amount"],
        "amount_refunded": intent["amount"],
        "currency": intent["currency"],
        "metadata": intent["metadata"],
        "paid": True,
        "payment_intent": intent["id"],
        "refunded": True,
        "status": "succeeded",
    }


def stripe_event(event_type: str, obj: dict[str, Any]) -> bytes:
    """A Stripe v1 event body carrying `obj` as data.object."""
    event = {
        "id": new_id("evt_"),
        "object": "event",
        "api_version": stripe.api_version,
        "created": int(time.time()),
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }
    return json.dumps(event, indent=2).encode("utf-8")
