"""The fake Stripe server, exercised with the real ``stripe`` library (v16).

These prove the fake speaks the protocol the library expects, and pin down
what the library does against each fault control.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator

import pytest
import requests
import stripe

from tests.fakes.stripe_server import FakeStripe, parse_stripe_form
from tests.support.stripe_signing import sign_stripe_payload, stripe_event


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server
    assert server.internal_errors == []


@pytest.fixture
def client(fake: FakeStripe) -> stripe.StripeClient:
    return stripe.StripeClient("sk_test_x", base_addresses={"api": fake.base_url}, max_network_retries=0)


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stripe.HTTPClient, "_sleep_time_seconds", lambda self, num_retries: 0.0)


def _create(client: stripe.StripeClient, key: str | None = None, **params: object) -> stripe.PaymentIntent:
    body = {"amount": 1500, "currency": "eur", **params}
    return client.v1.payment_intents.create(
        params=body,  # type: ignore[arg-type]
        options={"idempotency_key": key} if key else None,
    )


# --------------------------------------------------------------------------- create / idempotency


def test_create_returns_a_payment_intent(client: stripe.StripeClient, fake: FakeStripe) -> None:
    pi = client.v1.payment_intents.create(
        params={
            "amount": 2599,
            "currency": "EUR",
            "metadata": {"order_id": "ord_42", "cart": "7"},
            "automatic_payment_methods": {"enabled": True},
            "description": "Order 42",
        }
    )
    assert isinstance(pi, stripe.PaymentIntent)
    assert pi.id.startswith("pi_")
    assert pi.object == "payment_intent"
    assert pi.amount == 2599
    assert pi.currency == "eur"
    assert pi.status == "requires_payment_method"
    assert pi.client_secret is not None and pi.client_secret.startswith(pi.id + "_secret_")
    assert pi.metadata.to_dict() == {"order_id": "ord_42", "cart": "7"}
    assert pi.automatic_payment_methods is not None and pi.automatic_payment_methods.enabled is True
    assert pi.description == "Order 42"
    assert pi.cancellation_reason is None
    assert pi.livemode is False
    assert pi.capture_method == "automatic"
    assert abs(pi.created - time.time()) < 5

    stored = fake.get(pi.id)
    assert stored is not None and stored["metadata"] == {"order_id": "ord_42", "cart": "7"}
    (req,) = fake.requests
    assert (req.method, req.path, req.status) == ("POST", "/v1/payment_intents", 200)
    assert req.params["metadata"] == {"order_id": "ord_42", "cart": "7"}
    assert req.params["automatic_payment_methods"] == {"enabled": "true"}
    # The library sends an Idempotency-Key on every POST, generating one if none is given.
    assert req.idempotency_key
    assert req.header("authorization") == "Bearer sk_test_x"


def test_create_with_same_idempotency_key_returns_same_object(
    client: stripe.StripeClient, fake: FakeStripe
) -> None:
    first = _create(client, "order-1", metadata={"order_id": "1"})
    second = _create(client, "order-1", metadata={"order_id": "1"})
    assert second.id == first.id
    assert second.client_secret == first.client_secret
    assert len(fake.payment_intents) == 1
    assert second.last_response is not None
    assert second.last_response.headers["Idempotent-Replayed"] == "true"
    assert second.last_response.idempotency_key == "order-1"
    assert [r.idempotency_key for r in fake.requests] == ["order-1", "order-1"]
    assert fake.count("POST", "/v1/payment_intents") == 2


def test_same_idempotency_key_with_other_params_is_refused(
    client: stripe.StripeClient, fake: FakeStripe
) -> None:
    _create(client, "order-2")
    with pytest.raises(stripe.IdempotencyError) as info:
        _create(client, "order-2", amount=999)
    assert info.value.http_status == 400
    assert len(fake.payment_intents) == 1


def test_create_validates_amount_and_currency(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.payment_intents.create(params={"currency": "eur"})  # type: ignore[typeddict-item]
    assert (info.value.code, info.value.param) == ("parameter_missing", "amount")
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.payment_intents.create(params={"amount": 0, "currency": "eur"})
    assert info.value.param == "amount"
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.payment_intents.create(params={"amount": 100})  # type: ignore[typeddict-item]
    assert (info.value.code, info.value.param) == ("parameter_missing", "currency")


def test_bad_api_key_is_refused(fake: FakeStripe) -> None:
    bad = stripe.StripeClient("pk_test_x", base_addresses={"api": fake.base_url})
    with pytest.raises(stripe.AuthenticationError) as info:
        bad.v1.payment_intents.list()
    assert info.value.http_status == 401
    raw = requests.get(fake.base_url + "/v1/payment_intents", timeout=5)
    assert raw.status_code == 401
    assert raw.json()["error"]["type"] == "invalid_request_error"


# --------------------------------------------------------------------------- retrieve / cancel


def test_retrieve(client: stripe.StripeClient, fake: FakeStripe) -> None:
    created = _create(client)
    fake.set_status(created.id, "processing")
    got = client.v1.payment_intents.retrieve(created.id)
    assert got.id == created.id
    assert got.status == "processing"
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.payment_intents.retrieve("pi_missing")
    assert info.value.http_status == 404
    assert info.value.code == "resource_missing"


def test_cancel(client: stripe.StripeClient, fake: FakeStripe) -> None:
    pi = _create(client)
    canceled = client.v1.payment_intents.cancel(
        pi.id, params={"cancellation_reason": "abandoned"}, options={"idempotency_key": "cancel-1"}
    )
    assert canceled.status == "canceled"
    assert canceled.cancellation_reason == "abandoned"
    assert canceled.canceled_at is not None
    again = client.v1.payment_intents.cancel(
        pi.id, params={"cancellation_reason": "abandoned"}, options={"idempotency_key": "cancel-1"}
    )
    assert again.last_response is not None
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    state = fake.get(pi.id)
    assert state is not None and state["status"] == "canceled"


@pytest.mark.parametrize("status", ["succeeded", "canceled"])
def test_cancel_from_final_state_is_refused(
    client: stripe.StripeClient, fake: FakeStripe, status: str
) -> None:
    pi = _create(client)
    fake.set_status(pi.id, status)
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.payment_intents.cancel(pi.id)
    assert info.value.code == "payment_intent_unexpected_state"
    assert info.value.http_status == 400
    assert info.value.error is not None
    assert info.value.error.payment_intent is not None
    assert info.value.error.payment_intent.status == status
    state = fake.get(pi.id)
    assert state is not None and state["status"] == status


@pytest.mark.parametrize(
    "status",
    ["requires_payment_method", "requires_capture", "requires_confirmation", "requires_action", "processing"],
)
def test_cancel_from_open_states(client: stripe.StripeClient, fake: FakeStripe, status: str) -> None:
    seeded = fake.add_payment_intent(status=status, amount=500)
    assert client.v1.payment_intents.cancel(seeded["id"]).status == "canceled"


# --------------------------------------------------------------------------- list


def test_list_auto_paging_over_seeded_intents(client: stripe.StripeClient, fake: FakeStripe) -> None:
    base = 1_700_000_000
    for i in range(250):
        # pairs of intents share a `created` second: ordering must still be total across pages
        fake.add_payment_intent(created=base + i // 2, amount=100 + i, metadata={"i": str(i)})

    everything = list(client.v1.payment_intents.list(params={"limit": 100}).auto_paging_iter())
    assert len(everything) == 250
    assert len({pi.id for pi in everything}) == 250
    assert [int(pi.metadata["i"]) for pi in everything] == list(range(249, -1, -1))  # newest first
    assert fake.count("GET", "/v1/payment_intents") == 3

    fake.clear_requests()
    window = client.v1.payment_intents.list(
        params={"limit": 7, "created": {"gte": base + 10, "lt": base + 60}}
    ).auto_paging_iter()
    got = [int(pi.metadata["i"]) for pi in window]
    assert got == list(range(119, 19, -1))
    assert fake.count("GET") == 15  # 100 items / 7 per page
    assert fake.requests[1].params["created"] == {"gte": str(base + 10), "lt": str(base + 60)}
    assert fake.requests[1].params["starting_after"]

    first_page = client.v1.payment_intents.list()
    assert len(first_page.data) == 10 and first_page.has_more is True
    assert first_page.url == "/v1/payment_intents"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.list(params={"limit": 101})


def test_list_ending_before(client: stripe.StripeClient, fake: FakeStripe) -> None:
    ids = [fake.add_payment_intent(created=1_700_000_000 + i)["id"] for i in range(5)]
    page = client.v1.payment_intents.list(params={"ending_before": ids[1], "limit": 2})
    assert [pi.id for pi in page.data] == [ids[3], ids[2]]
    assert page.has_more is True


# --------------------------------------------------------------------------- fault controls and retries


def test_rate_limit_raises_rate_limit_error(client: stripe.StripeClient, fake: FakeStripe) -> None:
    fake.rate_limit(2)
    _create(client)
    _create(client)
    with pytest.raises(stripe.RateLimitError) as info:
        _create(client)
    assert info.value.http_status == 429
    # RateLimitError is built without `code`; it is only on the parsed error object.
    assert info.value.code is None
    assert info.value.error is not None and info.value.error.code == "rate_limit"
    assert fake.throttled == 1
    assert len(fake.payment_intents) == 2
    fake.rate_limit(None)
    _create(client)
    assert fake.throttled == 1


def test_rate_limit_window_resets_each_second(client: stripe.StripeClient, fake: FakeStripe) -> None:
    fake.rate_limit(1)
    _create(client)
    with pytest.raises(stripe.RateLimitError):
        _create(client)
    time.sleep(1.05)
    _create(client)
    assert fake.throttled == 1


def test_429_is_not_retried_by_the_library(fake: FakeStripe, no_backoff: None) -> None:
    retrying = fake.client(max_network_retries=3)
    fake.rate_limit(0)
    with pytest.raises(stripe.RateLimitError):
        retrying.v1.payment_intents.list()
    assert fake.count() == 1
    # ...unless Stripe says so.
    fake.rate_limit(0, should_retry=True)
    with pytest.raises(stripe.RateLimitError):
        retrying.v1.payment_intents.list()
    assert fake.count() == 1 + 4


def test_stripe_client_does_not_retry_by_default(fake: FakeStripe) -> None:
    default = stripe.StripeClient("sk_test_x", base_addresses={"api": fake.base_url})
    fake.fail_next(1, 500)
    with pytest.raises(stripe.APIError) as info:
        _create(default)
    assert info.value.http_status == 500
    assert fake.count() == 1
    assert fake.payment_intents == {}


def test_500_is_retried_with_the_same_idempotency_key(fake: FakeStripe, no_backoff: None) -> None:
    retrying = fake.client(max_network_retries=2)
    fake.fail_next(2, 500)
    pi = _create(retrying)  # no explicit key: the library generates one and reuses it
    assert [r.status for r in fake.requests] == [500, 500, 200]
    keys = {r.idempotency_key for r in fake.requests}
    assert len(keys) == 1 and None not in keys
    assert list(fake.payment_intents) == [pi.id]


def test_should_retry_false_stops_retries(fake: FakeStripe, no_backoff: None) -> None:
    retrying = fake.client(max_network_retries=2)
    fake.fail_next(1, 503, should_retry=False)
    with pytest.raises(stripe.APIError):
        retrying.v1.payment_intents.list()
    assert fake.count() == 1


def test_fail_next_error_kinds(client: stripe.StripeClient, fake: FakeStripe) -> None:
    fake.fail_next(1, 402, "card_declined")
    fake.fail_next(1, 404, "resource_missing")
    with pytest.raises(stripe.CardError) as card:
        _create(client)
    assert card.value.code == "card_declined"
    with pytest.raises(stripe.InvalidRequestError):
        _create(client)
    _create(client)
    assert [r.status for r in fake.requests] == [402, 404, 200]


def test_fail_all_and_heal(client: stripe.StripeClient, fake: FakeStripe) -> None:
    fake.fail_all(503)
    for _ in range(3):
        with pytest.raises(stripe.APIError):
            client.v1.payment_intents.list()
    fake.heal()
    assert client.v1.payment_intents.list().data == []


def test_delay_makes_the_client_time_out_but_the_request_is_applied(fake: FakeStripe) -> None:
    impatient = stripe.StripeClient(
        "sk_test_x",
        base_addresses={"api": fake.base_url},
        http_client=stripe.RequestsClient(timeout=0.3),
        max_network_retries=0,
    )
    fake.delay(0.8)
    with pytest.raises(stripe.APIConnectionError) as info:
        _create(impatient, "slow-1")
    assert info.value.should_retry is True
    assert len(fake.payment_intents) == 1  # Stripe did it; we never heard back
    fake.delay(None)
    replay = _create(impatient, "slow-1")
    assert list(fake.payment_intents) == [replay.id]


def test_a_connection_is_kept_alive_across_requests(fake: FakeStripe) -> None:
    # Like Stripe: HTTP/1.1, so the library's session reuses its connection.
    fake.add_payment_intent(id="pi_alive")
    connection = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    headers = {"Authorization": "Bearer sk_test_x"}
    try:
        answers = []
        for _ in range(2):
            connection.request("GET", "/v1/payment_intents/pi_alive", headers=headers)
            answer = connection.getresponse()
            answers.append((answer.version, answer.status, json.loads(answer.read())["id"]))
            socket_used = connection.sock
            assert socket_used is not None  # not closed by the server
        assert answers == [(11, 200, "pi_alive")] * 2
    finally:
        connection.close()


def test_concurrent_requests_are_safe(fake: FakeStripe) -> None:
    c = fake.client()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                _create(c, "shared-key")
                _create(c)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(fake.payment_intents) == 1 + 80
    assert fake.count("POST") == 160


# --------------------------------------------------------------------------- form parsing


def test_parse_stripe_form() -> None:
    parsed = parse_stripe_form(
        "amount=100&metadata[order_id]=o1&metadata[0]=zero&automatic_payment_methods[enabled]=true"
        "&payment_method_types[0]=card&payment_method_types[1]=sepa_debit&expand[]=a&expand[]=b"
        "&created[gte]=5&empty="
    )
    assert parsed == {
        "amount": "100",
        "metadata": {"order_id": "o1", "0": "zero"},
        "automatic_payment_methods": {"enabled": "true"},
        "payment_method_types": ["card", "sepa_debit"],
        "expand": ["a", "b"],
        "created": {"gte": "5"},
        "empty": "",
    }


# --------------------------------------------------------------------------- webhook signing helper


def test_signing_round_trips_through_construct_event() -> None:
    obj = {"id": "pi_123", "object": "payment_intent", "status": "succeeded", "amount": 1500}
    body = stripe_event("payment_intent.succeeded", obj, event_id="evt_1")
    header = sign_stripe_payload(body, "whsec_test")
    event = stripe.Webhook.construct_event(body, header, "whsec_test")
    assert event.id == "evt_1"
    assert event.type == "payment_intent.succeeded"
    assert event.data.object["id"] == "pi_123"
    assert event.livemode is False
    assert stripe.WebhookSignature.verify_header(body.decode(), header, "whsec_test")
    # the library's own generator agrees byte for byte
    ts = int(header.split(",")[0][2:])
    assert header == stripe.WebhookSignature.generate_signature_header(body.decode(), "whsec_test", ts)


def test_signing_refusals() -> None:
    body = stripe_event("payment_intent.payment_failed", {"id": "pi_1", "object": "payment_intent"})
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body, sign_stripe_payload(body, "whsec_other"), "whsec_test")
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body + b" ", sign_stripe_payload(body, "whsec_test"), "whsec_test")
    stale = sign_stripe_payload(body, "whsec_test", timestamp=int(time.time()) - 301)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body, stale, "whsec_test", tolerance=300)
    both = sign_stripe_payload(body, "whsec_old", extra_secrets=("whsec_new",))
    assert stripe.Webhook.construct_event(body, both, "whsec_new").type == "payment_intent.payment_failed"
