"""A Stripe failure at checkout: the 502 and the order's timeline say what
failed (timeout, refused connection, HTTP status) and never carry the API key
or the address payfleet sends Stripe's requests to."""

from __future__ import annotations

import json

import pytest
from falcon import testing

from ingress.app import collaborators, create_app
from payfleet.platform.config import load_settings
from tests.conftest import free_port, scalar
from tests.support.shop import checkout, order, put_product


def _stripe_broken(fake_stripe, fault: str, key: str) -> str:
    """Break Stripe the way `fault` says; the base address the app should use."""
    if fault == "key-refused":
        # Stripe's own text for a bad key quotes (part of) the key.
        fake_stripe.fail_all(401, code=None, message=f"Invalid API Key provided: {key}")
    elif fault == "http-500":
        fake_stripe.fail_all(500)
    elif fault == "timeout":
        fake_stripe.delay(2.5)
    else:  # down: nothing listens there
        return f"http://127.0.0.1:{free_port()}"
    return str(fake_stripe.base_url)


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("key-refused", "HTTP 401"),
        ("http-500", "answered HTTP 500"),
        ("timeout", "timed out"),
        ("down", "refused the connection"),
    ],
)
def test_a_stripe_failure_at_checkout_names_the_failure_but_not_the_key_or_address(
    env, fake_stripe, sessions, fault, said
):
    key = env["STRIPE_API_KEY"]
    base = _stripe_broken(fake_stripe, fault, key)
    parts = collaborators(load_settings({**env, "STRIPE_API_BASE": base, "STRIPE_TIMEOUT_SECONDS": "1"}))
    try:
        client = testing.TestClient(create_app(parts))
        put_product(client, "FRAGILE", on_hand=5)

        answer = checkout(client, ("FRAGILE", 2))

        assert (answer.status_code, answer.json["error"]) == (502, "provider_error"), answer.text
        timeline = order(client, str(scalar(sessions, "SELECT id FROM orders")))["timeline"]
    finally:
        fake_stripe.delay(0)
        parts.engine.dispose()
    detail = answer.json["detail"]
    assert "Stripe" in detail and said in detail, detail
    failures = [entry["reason"] for entry in timeline if entry.get("to") == "failed"]
    assert failures and all(said in reason for reason in failures), timeline
    for text in (answer.text, json.dumps(timeline)):
        assert key not in text
        assert base not in text and "127.0.0.1" not in text
