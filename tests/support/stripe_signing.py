"""Build and sign Stripe webhook deliveries the way Stripe does.

``Stripe-Signature: t=<unix ts>,v1=<hex HMAC-SHA256(secret, f"{t}.{raw body}")>``.
The secret (``whsec_...``) is used as the HMAC key as-is (its UTF-8 bytes,
not base64-decoded) -- exactly what ``stripe.WebhookSignature.verify_header``
recomputes, so ``stripe.Webhook.construct_event(body, header, secret)``
accepts the pair.

    body = stripe_event("payment_intent.succeeded", {"id": "pi_1", "object": "payment_intent", ...})
    header = sign_stripe_payload(body, "whsec_test")
    requests.post(url, data=body, headers={"Stripe-Signature": header,
                                           "Content-Type": "application/json"})

Note: stripe v16's ``verify_header`` only refuses timestamps older than the
tolerance; a timestamp far in the *future* passes the library's check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import string
import time
from typing import Any

import stripe

__all__ = ["sign_stripe_payload", "stripe_event", "stripe_signature_header"]

_ALNUM = string.ascii_letters + string.digits


def sign_stripe_payload(
    payload: bytes | str,
    secret: str,
    timestamp: int | None = None,
    *,
    extra_secrets: tuple[str, ...] = (),
) -> str:
    """Return a ``Stripe-Signature`` header value for ``payload`` signed with ``secret``.

    ``timestamp`` defaults to now. ``extra_secrets`` adds one more ``v1=``
    entry per secret (what Stripe sends while a secret is being rolled).
    """
    ts = int(time.time()) if timestamp is None else int(timestamp)
    body = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
    signed = f"{ts}.".encode() + body
    parts = [f"t={ts}"]
    for key in (secret, *extra_secrets):
        parts.append("v1=" + hmac.new(key.encode("utf-8"), signed, hashlib.sha256).hexdigest())
    return ",".join(parts)


# Alias with a more descriptive name.
stripe_signature_header = sign_stripe_payload


def stripe_event(
    event_type: str,
    obj: dict[str, Any],
    event_id: str | None = None,
    created: int | None = None,
    *,
    api_version: str | None = None,
    previous_attributes: dict[str, Any] | None = None,
) -> bytes:
    """A realistic Stripe v1 event body (JSON bytes) carrying ``obj`` as ``data.object``."""
    data: dict[str, Any] = {"object": obj}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    event = {
        "id": event_id or "evt_" + "".join(secrets.choice(_ALNUM) for _ in range(24)),
        "object": "event",
        "api_version": api_version or stripe.api_version,
        "created": int(time.time()) if created is None else int(created),
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }
    return json.dumps(event, indent=2).encode("utf-8")
