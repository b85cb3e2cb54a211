"""The jobs' Stripe client reads the environment's proxy settings once, at
start, instead of on every call: the proxies the environment names for the
Stripe base address must still apply, and NO_PROXY still exempt it."""

from __future__ import annotations

import pytest

from domain.errors import ProviderError
from domain.gateways import StripeApiGateway
from domain.throttle import RateLimiter, ThrottledRequestsClient
from tests.conftest import free_port
from tests.fakes.stripe_server import FakeStripe


def gateway(fake: FakeStripe) -> StripeApiGateway:
    client = ThrottledRequestsClient(RateLimiter(0), timeout=2, base_url=fake.base_url)
    return StripeApiGateway("sk_test_proxies", fake.base_url, timeout=2, max_retries=0, http_client=client)


def test_a_proxy_named_by_the_environment_still_carries_the_calls(monkeypatch, fake_stripe):
    intent = fake_stripe.add_payment_intent()
    # Nothing listens there: a call that goes through the proxy fails.
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    through_proxy = gateway(fake_stripe)
    with pytest.raises(ProviderError, match=r"refused the connection|could not be reached"):
        through_proxy.retrieve_payment_intent(intent["id"])
    assert fake_stripe.count("GET") == 0

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = gateway(fake_stripe)
    assert direct.retrieve_payment_intent(intent["id"]).id == intent["id"]
    assert fake_stripe.count("GET") == 1
