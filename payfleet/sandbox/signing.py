"""Signing deliveries the way the providers do, so the ingress verifies the
sandbox's webhooks with the very code that verifies the real ones.

Stripe: ``Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``,
the ``whsec_…`` secret used as the key as it is. Monetbil: ``sign`` is the
lowercase hex MD5 of the service secret followed by the values of every other
posted field, in field-name order."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping


def stripe_signature(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    ts = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode("utf-8"), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def monetbil_sign(fields: Mapping[str, str], secret: str) -> str:
    values = "".join(str(fields[name]) for name in sorted(fields) if name != "sign")
    return hashlib.md5((secret + values).encode("utf-8")).hexdigest()
