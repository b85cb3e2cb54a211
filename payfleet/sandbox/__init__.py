"""The local provider sandbox (`payfleet sandbox`): Stripe's PaymentIntents
API and Monetbil's widget and check-payment, served on one local address,
sending signed webhooks to the shop as the providers do. No real money
moves; a live Stripe key refuses it.

This module stays light (no provider library): `payfleet up` reads it to
decide whether to start the sandbox and what its children are told."""

from __future__ import annotations

import secrets

# Keys the sandbox accepts; they open nothing anywhere else.
SANDBOX_STRIPE_KEY = "sk_test_sandbox"
SANDBOX_MONETBIL_KEY = "sandbox_service"
# What a sandbox started on its own signs with when the settings name no
# secret (`payfleet up` makes fresh ones for each run instead).
DEFAULT_STRIPE_WEBHOOK_SECRET = "whsec_sandbox"
DEFAULT_MONETBIL_SECRET = "sandbox_secret"

NOTICE = (
    "sandbox providers: no real money moves; set STRIPE_API_KEY (and STRIPE_WEBHOOK_SECRETS) "
    "or MONETBIL_SERVICE_KEY (and MONETBIL_SERVICE_SECRET) to use the real providers"
)


def wanted(stripe_api_key: str, monetbil_service_key: str) -> bool:
    """The sandbox stands in when no provider is configured at all."""
    return not stripe_api_key and not monetbil_service_key


def environment(bind: str) -> dict[str, str]:
    """What the fleet's processes are told in sandbox mode: the sandbox's
    address as both providers' API base, its keys, and secrets fresh for
    this run (so no one else's copy of the code can sign for this fleet)."""
    base = f"http://{bind}"
    return {
        "STRIPE_API_KEY": SANDBOX_STRIPE_KEY,
        "STRIPE_WEBHOOK_SECRETS": f"whsec_sandbox_{secrets.token_hex(16)}",
        "STRIPE_API_BASE": base,
        "MONETBIL_SERVICE_KEY": SANDBOX_MONETBIL_KEY,
        "MONETBIL_SERVICE_SECRET": secrets.token_hex(16),
        "MONETBIL_API_BASE": base,
        "SANDBOX_BIND": bind,
    }
