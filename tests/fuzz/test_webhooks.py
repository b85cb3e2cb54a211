"""Validly signed garbage for both webhooks: the signature is right, so all
that stands between the body and PostgreSQL is payfleet's own reading of
it. Plus garbage signatures. The guard (conftest) checks each answer: a 2xx
stored a real event, anything else stored nothing."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

from falcon import testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import MONETBIL_SECRET, WEBHOOK_SECRETS
from tests.fuzz.conftest import Guard, Shop
from tests.fuzz.nasty import FUZZ, examples, mutated
from tests.support.monetbil_signing import sign_monetbil
from tests.support.stripe_signing import sign_stripe_payload

STRIPE_EVENT = {
    "id": "evt_fuzz",
    "object": "event",
    "type": "payment_intent.succeeded",
    "created": 1_700_000_000,
    "livemode": False,
    "data": {
        "object": {
            "id": "pi_fuzz",
            "object": "payment_intent",
            "amount": 1500,
            "currency": "eur",
            "status": "succeeded",
            "metadata": {"order_id": "x"},
        }
    },
}
HEADER_TEXT = st.text(st.sampled_from("t=v1,0123456789abcdef -_."), max_size=80)
MONETBIL_NAMES = [
    "service",
    "transaction_id",
    "transaction_uuid",
    "payment_ref",
    "item_ref",
    "status",
    "amount",
    "currency",
    "msisdn",
]
MONETBIL_CALLBACK = {"service": "svc", "transaction_id": "TX1", "status": "success", "amount": "1500"}
MONETBIL_VALUES = st.one_of(
    st.sampled_from(["success", "failed", "pending", "cancelled", "TX1", "1500", "XAF", "", "x" * 300]),
    st.text(st.characters(exclude_categories=["Cs"]) | st.just("\x00"), max_size=20),
)


@st.composite
def stripe_delivery(draw: st.DrawFn) -> tuple[bytes, str]:
    """A mutated event, signed now with a live secret; now and then a
    signature that is wrong, stale or malformed."""
    event = dict(STRIPE_EVENT, id=f"evt_{draw(st.integers(0, 10**9))}")
    body = draw(mutated(event))
    now = int(time.time())
    header = draw(
        st.one_of(
            st.just(sign_stripe_payload(body, draw(st.sampled_from(WEBHOOK_SECRETS)))),
            st.just(sign_stripe_payload(body, WEBHOOK_SECRETS[0], timestamp=now - 3600)),
            st.just(sign_stripe_payload(body, "whsec_wrong")),
            st.just(f"t={now}=1," + sign_stripe_payload(body, WEBHOOK_SECRETS[0]).split(",", 1)[1]),
            HEADER_TEXT,
        )
    )
    return body, header


@settings(FUZZ, max_examples=examples(120))
@given(delivery=stripe_delivery())
def test_signed_garbage_to_the_stripe_webhook(
    client: testing.TestClient, shop: Shop, guard: Guard, delivery: tuple[bytes, str]
) -> None:
    body, header = delivery
    before = guard.before()
    answer = client.simulate_post("/webhooks/stripe", body=body, headers={"Stripe-Signature": header})
    guard.check("POST", "/webhooks/stripe", answer.status_code, False, before, answer.text)


@st.composite
def monetbil_form(draw: st.DrawFn) -> bytes:
    """Any set of fields, signed with the service secret (or not), form-encoded."""
    names = st.sampled_from(MONETBIL_NAMES) | st.text(min_size=1, max_size=8)
    fields: dict[str, str] = draw(st.dictionaries(names, MONETBIL_VALUES, max_size=10))
    if draw(st.booleans()):
        # Half start from a callback accepted as it is, the drawn fields over
        # it: drawn fields alone seldom carry both transaction_id and status,
        # and one CI run of 100 forms had none accepted (the guard's check).
        fields = {**MONETBIL_CALLBACK, **fields}
    if draw(st.integers(0, 4)):
        fields["sign"] = sign_monetbil(fields, MONETBIL_SECRET)
    pairs = [(quote(k.encode(), safe=""), quote(v.encode(), safe="")) for k, v in fields.items()]
    return "&".join(f"{k}={v}" for k, v in pairs).encode()


@settings(FUZZ, max_examples=examples(100))
@given(form=monetbil_form())
def test_signed_garbage_to_the_monetbil_webhook(
    client: testing.TestClient, shop: Shop, guard: Guard, form: bytes
) -> None:
    before = guard.before()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    answer = client.simulate_post("/webhooks/monetbil", body=form, headers=headers)
    guard.check("POST", "/webhooks/monetbil", answer.status_code, False, before, answer.text)


def test_the_fuzzed_stripe_template_is_itself_accepted(client: testing.TestClient, shop: Shop) -> None:
    """The template the mutations start from is a valid event: refusals come from the mutations."""
    body = json.dumps(dict(STRIPE_EVENT, id="evt_template")).encode()
    headers = {"Stripe-Signature": sign_stripe_payload(body, WEBHOOK_SECRETS[0])}
    assert client.simulate_post("/webhooks/stripe", body=body, headers=headers).status_code == 200
