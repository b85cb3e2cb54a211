"""The tests' fake Stripe is the sandbox's Stripe API (payfleet/sandbox/stripe_api.py,
whose docstring says what it serves, how failures are injected and what the
``stripe`` library does against each), on 127.0.0.1 and a port the OS picks."""

from __future__ import annotations

from payfleet.sandbox.stripe_api import (
    CANCELABLE_STATUSES,
    PAYMENT_INTENT_STATUSES,
    RecordedRequest,
    StripeApi,
    parse_stripe_form,
)

__all__ = [
    "CANCELABLE_STATUSES",
    "PAYMENT_INTENT_STATUSES",
    "FakeStripe",
    "RecordedRequest",
    "parse_stripe_form",
]


class FakeStripe(StripeApi):
    thread_name = "fake-stripe"
