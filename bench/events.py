"""Stripe webhook deliveries as Stripe sends them: a compact event JSON and
its `Stripe-Signature` (signed by the tests' own helper)."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import stripe

from tests.support.stripe_signing import sign_stripe_payload


def event_id() -> str:
    return "evt_bench_" + secrets.token_hex(12)


def intent_event(
    intent_id: str, amount: int, metadata: dict[str, str], evt: str | None = None
) -> dict[str, Any]:
    """A `payment_intent.succeeded` event whose data.object is the PaymentIntent."""
    now = int(time.time())
    return {
        "id": evt or event_id(),
        "object": "event",
        "api_version": stripe.api_version,
        "created": now,
        "data": {
            "object": {
                "id": intent_id,
                "object": "payment_intent",
                "amount": amount,
                "amount_received": amount,
                "currency": "eur",
                "status": "succeeded",
                "metadata": metadata,
                "created": now,
                "livemode": False,
            }
        },
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": "payment_intent.succeeded",
    }


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def signed(body: bytes, secret: str, timestamp: int | None = None) -> str:
    return sign_stripe_payload(body, secret, timestamp)
