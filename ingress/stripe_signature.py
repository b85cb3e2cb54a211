"""Stripe-Signature verification, over the raw body, before any parsing."""

from __future__ import annotations

import time

import falcon
import stripe

from ingress.errors import ApiError


def verify(payload: bytes, header: str | None, secrets: tuple[str, ...], tolerance: int) -> None:
    """Accept the body if any configured secret signed it (several secrets
    are live during a rotation) within `tolerance` seconds of now, either way:
    the library only refuses old timestamps, payfleet refuses future ones too."""
    if not secrets:
        raise ApiError(falcon.HTTP_503, "not_configured", "STRIPE_WEBHOOK_SECRETS is empty")
    if not header:
        raise ApiError(falcon.HTTP_400, "missing_signature", "Stripe-Signature header is required")
    if not any(_signed_with(payload, header, secret) for secret in secrets):
        raise ApiError(falcon.HTTP_400, "bad_signature", "no valid signature for this body")
    skew = time.time() - _timestamp(header)
    if abs(skew) > tolerance:
        which = "old" if skew > 0 else "far in the future"
        raise ApiError(
            falcon.HTTP_400, "stale_timestamp", f"signature timestamp is {int(abs(skew))} s {which}"
        )


def _signed_with(payload: bytes, header: str, secret: str) -> bool:
    try:
        return bool(stripe.WebhookSignature.verify_header(payload, header, secret, tolerance=None))
    except (stripe.SignatureVerificationError, UnicodeDecodeError):
        return False


def _timestamp(header: str) -> int:
    # The first `t`, read exactly as the library reads it when it checks the
    # signature (each item split on "=" at most twice, the second part taken:
    # `t=<now>=1` is signed at <now>), so the age checked is the one signed.
    # A second, fresher `t` appended to an old signed header must not pass
    # the age check. verify_header has parsed it, so it is an int.
    items = [item.split("=", 2) for item in header.split(",")]
    return int(next(item[1] for item in items if item[0] == "t"))
