"""POST /checkout against the real app, PostgreSQL and the real stripe library
talking to the fake Stripe: what a customer gets back, what the database
holds afterwards, and what reached Stripe (promises 4 and 8)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from falcon import testing
from sqlalchemy import text

from ingress.app import collaborators, create_app
from payfleet.platform.config import load_settings
from tests.conftest import scalar
from tests.support.shop import checkout, order, product, put_product, race

CREATE_PATH = "/v1/payment_intents"


# --------------------------------------------------------------------------- helpers


def state(sessions) -> dict[str, Any]:
    """Everything a checkout could change, to compare before and after."""
    with sessions() as session:

        def rows(sql: str) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in session.execute(text(sql)).all()]

        return {
            "orders": rows("SELECT id, status FROM orders ORDER BY id"),
            "order_lines": rows("SELECT order_id, sku, quantity FROM order_lines ORDER BY id"),
            "payments": rows("SELECT id, status, provider_payment_id FROM payments ORDER BY id"),
            "reservations": rows(
                "SELECT order_id, sku, quantity, status FROM stock_reservations ORDER BY id"
            ),
            "movements": rows("SELECT id FROM stock_movements ORDER BY id"),
            "transitions": rows("SELECT id FROM order_transitions ORDER BY id"),
            "products": rows("SELECT sku, on_hand, reserved FROM products ORDER BY sku"),
        }


def body_for(*lines: tuple[str, int], **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "items": [{"sku": sku, "quantity": quantity} for sku, quantity in lines],
        "provider": "stripe",
        "currency": "EUR",
        "customer": {"email": "ada@example.com", "phone": "+33600000000"},
    }
    body.update(overrides)
    return body


def creates(fake_stripe) -> list[Any]:
    return [r for r in fake_stripe.requests if r.method == "POST" and r.path == CREATE_PATH]


def product_row(sessions, sku: str) -> tuple[int, int]:
    with sessions() as session:
        row = session.execute(
            text("SELECT on_hand, reserved FROM products WHERE sku = :sku"), {"sku": sku}
        ).one()
    return int(row[0]), int(row[1])


def answered(client: testing.TestClient, body: Any) -> testing.Result:
    """POST /checkout; an exception escaping the app (no HTTP answer at all) fails the test."""
    try:
        if isinstance(body, bytes):
            return client.simulate_post("/checkout", body=body, headers={"Content-Type": "application/json"})
        return client.simulate_post("/checkout", json=body)
    except Exception as error:
        pytest.fail(f"the app raised {type(error).__name__} instead of answering: {error}")


class StockSampler:
    """Reads the products table over and over while a race runs and keeps
    every reading that breaks 0 <= reserved <= on_hand."""

    def __init__(self, sessions, skus: list[str]) -> None:
        self._sessions, self._skus = sessions, skus
        self._stop = threading.Event()
        self.samples = 0
        self.violations: list[tuple[str, int, int]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sql = text("SELECT sku, on_hand, reserved FROM products WHERE sku = ANY(:skus)")
        while not self._stop.is_set():
            with self._sessions() as session:
                for sku, on_hand, reserved in session.execute(sql, {"skus": self._skus}):
                    self.samples += 1
                    if reserved < 0 or reserved > on_hand or on_hand < 0:
                        self.violations.append((sku, on_hand, reserved))

    def __enter__(self) -> StockSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --------------------------------------------------------------------------- 1. happy path


def test_checkout_answers_201_holds_the_stock_and_creates_one_payment_intent(client, fake_stripe, sessions):
    put_product(client, "TEE-M", on_hand=5, price=1500)
    put_product(client, "MUG", on_hand=10, price=250)

    answer = checkout(client, ("TEE-M", 2), ("MUG", 3))

    assert answer.status_code == 201, answer.text
    placed = answer.json
    assert set(placed) >= {"order_id", "status", "expires_at", "payment"}
    assert placed["status"] == "pending_payment"
    order_id = placed["order_id"]
    uuid.UUID(order_id)
    expires_at = datetime.fromisoformat(placed["expires_at"])
    assert expires_at.tzinfo is not None
    ahead = expires_at - datetime.now(UTC)
    assert timedelta(minutes=29) < ahead <= timedelta(minutes=30, seconds=5)

    payment = placed["payment"]
    assert payment["provider"] == "stripe"
    intent_id = payment["provider_payment_id"]
    assert intent_id and intent_id.startswith("pi_")
    intent = fake_stripe.get(intent_id)
    assert intent is not None
    assert payment["client_secret"] == intent["client_secret"]

    sent = creates(fake_stripe)
    assert len(sent) == 1, [(r.method, r.path) for r in fake_stripe.requests]
    assert fake_stripe.count() == 1
    request = sent[0]
    total = 2 * 1500 + 3 * 250
    assert int(request.params["amount"]) == total  # the fake records form values as strings
    assert request.params["currency"] == "eur"
    seen = order(client, order_id)
    payment_id = seen["payment"]["id"]
    assert request.params["metadata"] == {"order_id": order_id, "payment_id": payment_id}
    assert request.idempotency_key == f"payfleet-checkout-{payment_id}"
    assert (intent["amount"], intent["currency"]) == (total, "eur")

    assert seen["status"] == "pending_payment"
    assert seen["total_amount"] == total
    assert seen["customer"] == {"email": "ada@example.com", "phone": "+33600000000"}
    assert seen["payment"]["status"] == "pending"
    assert seen["payment"]["provider_payment_id"] == intent_id
    assert (seen["payment"]["amount"], seen["payment"]["currency"]) == (total, "EUR")
    assert sorted((line["sku"], line["quantity"], line["unit_price"]) for line in seen["lines"]) == [
        ("MUG", 3, 250),
        ("TEE-M", 2, 1500),
    ]
    assert (product(client, "TEE-M")["reserved"], product(client, "MUG")["reserved"]) == (2, 3)
    with sessions() as session:
        held = session.execute(
            text("SELECT sku, quantity, status FROM stock_reservations WHERE order_id = :id ORDER BY sku"),
            {"id": order_id},
        ).all()
    assert [tuple(row) for row in held] == [("MUG", 3, "active"), ("TEE-M", 2, "active")]
    # Holding stock is not selling it: no movement until the payment succeeds.
    assert scalar(sessions, "SELECT count(*) FROM stock_movements WHERE reference = :r", r=order_id) == 0


# --------------------------------------------------------------------------- 2. races


def test_fifty_concurrent_checkouts_for_ten_units_sell_exactly_ten(client, fake_stripe, sessions):
    put_product(client, "RACE", on_hand=10)

    with StockSampler(sessions, ["RACE"]) as sampler:
        results = race([lambda: checkout(client, ("RACE", 1)) for _ in range(50)])

    statuses = sorted(r.status_code for r in results)
    assert statuses.count(201) == 10, [(r.status_code, r.text) for r in results if r.status_code != 409]
    assert statuses.count(409) == 40, statuses
    for refused in (r for r in results if r.status_code == 409):
        assert refused.json["error"] == "insufficient_stock"
        assert (refused.json["sku"], refused.json["available"]) == ("RACE", 0)
    assert product_row(sessions, "RACE") == (10, 10)
    assert scalar(sessions, "SELECT count(*) FROM stock_reservations WHERE status = 'active'") == 10
    assert scalar(sessions, "SELECT coalesce(sum(quantity), 0) FROM stock_reservations") == 10
    placed = {r.json["order_id"] for r in results if r.status_code == 201}
    with sessions() as session:
        holders = {str(o) for o in session.execute(text("SELECT order_id FROM stock_reservations")).scalars()}
    assert holders == placed
    assert scalar(sessions, "SELECT count(*) FROM orders") == 10
    assert len(creates(fake_stripe)) == 10
    assert sampler.samples > 0
    assert sampler.violations == []


@pytest.mark.parametrize(("stock_a", "stock_b"), [(10, 4), (4, 10)], ids=["B-short", "A-short"])
def test_racing_two_line_orders_never_leave_an_order_half_reserved(client, sessions, stock_a, stock_b):
    put_product(client, "LINE-A", on_hand=stock_a)
    put_product(client, "LINE-B", on_hand=stock_b)
    # Half the orders list B first: the lock order must not depend on the body.
    shapes = [(("LINE-A", 1), ("LINE-B", 1)), (("LINE-B", 1), ("LINE-A", 1))]

    with StockSampler(sessions, ["LINE-A", "LINE-B"]) as sampler:
        results = race([lambda shape=shapes[i % 2]: checkout(client, *shape) for i in range(30)])

    short, fill = ("LINE-B", 4) if stock_b < stock_a else ("LINE-A", 4)
    assert sum(r.status_code == 201 for r in results) == fill, [r.status_code for r in results]
    refused = [r for r in results if r.status_code != 201]
    assert len(refused) == 30 - fill
    for answer in refused:
        assert answer.status_code == 409, answer.text
        assert (answer.json["error"], answer.json["sku"], answer.json["available"]) == (
            "insufficient_stock",
            short,
            0,
        )
    assert product_row(sessions, "LINE-A")[1] == fill
    assert product_row(sessions, "LINE-B")[1] == fill
    placed = {r.json["order_id"] for r in results if r.status_code == 201}
    with sessions() as session:
        held = session.execute(
            text("SELECT order_id, sku, quantity FROM stock_reservations WHERE status = 'active'")
        ).all()
        orders = {str(o) for o in session.execute(text("SELECT id FROM orders")).scalars()}
    by_order: dict[str, list[tuple[str, int]]] = {}
    for order_id, sku, quantity in held:
        by_order.setdefault(str(order_id), []).append((sku, quantity))
    # Every reservation belongs to a placed order, and every placed order holds both lines.
    assert set(by_order) == placed == orders
    assert all(sorted(lines) == [("LINE-A", 1), ("LINE-B", 1)] for lines in by_order.values())
    assert sampler.violations == []


def test_a_mixed_race_keeps_reserved_equal_to_what_placed_orders_hold(client, sessions):
    put_product(client, "MIX-A", on_hand=7)
    put_product(client, "MIX-B", on_hand=5)
    shapes = [
        (("MIX-A", 1), ("MIX-B", 1)),
        (("MIX-B", 2),),
        (("MIX-A", 2),),
        (("MIX-B", 1), ("MIX-A", 1)),
    ]
    chosen = [shapes[i % 4] for i in range(40)]
    calls = [lambda shape=shape: checkout(client, *shape) for shape in chosen]

    with StockSampler(sessions, ["MIX-A", "MIX-B"]) as sampler:
        results = race(calls)

    assert {r.status_code for r in results} <= {201, 409}, [r.text for r in results if r.status_code >= 500]
    wanted: dict[str, dict[str, int]] = {}
    for shape, answer in zip(chosen, results, strict=True):
        if answer.status_code == 201:
            wanted[answer.json["order_id"]] = dict(shape)
        else:
            assert answer.json["sku"] in dict(shape)
    with sessions() as session:
        held = session.execute(text("SELECT order_id, sku, quantity FROM stock_reservations")).all()
    holding: dict[str, dict[str, int]] = {}
    for order_id, sku, quantity in held:
        holding.setdefault(str(order_id), {})[sku] = quantity
    assert holding == wanted
    for sku in ("MIX-A", "MIX-B"):
        on_hand, reserved = product_row(sessions, sku)
        assert reserved == sum(lines.get(sku, 0) for lines in wanted.values())
        assert 0 <= reserved <= on_hand
    assert sampler.violations == []


# --------------------------------------------------------------------------- 3. bad input

LONG_SKU = "S" * 65
VALID = body_for(("BAD-IN", 1))


def _item(**fields: Any) -> dict[str, Any]:
    return body_for(items=[{"sku": "BAD-IN", "quantity": 1, **fields}])


def _without(name: str) -> dict[str, Any]:
    return {k: v for k, v in VALID.items() if k != name}


BAD_BODIES: list[Any] = [
    pytest.param(b"{not json", 400, {"malformed_body"}, id="not-json"),
    pytest.param(b"\xff\xfe\x00", 400, {"malformed_body"}, id="not-utf8"),
    pytest.param(b"", 400, {"malformed_body"}, id="empty-body"),
    pytest.param(json.dumps([VALID]).encode(), 400, {"malformed_body"}, id="json-array"),
    pytest.param(b'"stripe"', 400, {"malformed_body"}, id="json-string"),
    pytest.param(_without("items"), 400, {"invalid_request"}, id="missing-items"),
    pytest.param(body_for(items=[]), 400, {"invalid_request"}, id="empty-items"),
    pytest.param(
        body_for(items={"sku": "BAD-IN", "quantity": 1}), 400, {"invalid_request"}, id="items-object"
    ),
    pytest.param(body_for(items=["BAD-IN"]), 400, {"invalid_request"}, id="item-not-object"),
    pytest.param(
        body_for(("BAD-IN", 1)) | {"items": [{"sku": "BAD-IN", "quantity": 1}] * 101},
        400,
        {"order_too_large"},
        id="too-many-lines",
    ),
    pytest.param(_item(quantity=0), 400, {"invalid_request"}, id="quantity-zero"),
    pytest.param(_item(quantity=-1), 400, {"invalid_request"}, id="quantity-negative"),
    pytest.param(_item(quantity=1.5), 400, {"invalid_request"}, id="quantity-fraction"),
    pytest.param(_item(quantity="1"), 400, {"invalid_request"}, id="quantity-string"),
    pytest.param(_item(quantity=True), 400, {"invalid_request"}, id="quantity-boolean"),
    pytest.param(_item(quantity=None), 400, {"invalid_request"}, id="quantity-null"),
    pytest.param(_item(quantity=10_001), 400, {"order_too_large"}, id="quantity-over-max"),
    pytest.param(_item(sku=""), 400, {"invalid_request"}, id="sku-empty"),
    pytest.param(_item(sku=LONG_SKU), 400, {"invalid_request"}, id="sku-too-long"),
    pytest.param(_item(sku=42), 400, {"invalid_request"}, id="sku-number"),
    pytest.param(_item(sku="NOPE"), 400, {"unknown_sku"}, id="unknown-sku"),
    pytest.param(body_for(("BAD-IN", 1), ("NOPE", 1)), 400, {"unknown_sku"}, id="unknown-sku-second-line"),
    pytest.param(_item(sku="BAD\x00IN"), 400, {"invalid_request", "unknown_sku"}, id="sku-nul-byte"),
    pytest.param(body_for(("BAD-IN", 1), currency="EU"), 400, {"invalid_request"}, id="currency-2-letters"),
    pytest.param(body_for(("BAD-IN", 1), currency="EURO"), 400, {"invalid_request"}, id="currency-4-letters"),
    pytest.param(body_for(("BAD-IN", 1), currency="E1R"), 400, {"invalid_request"}, id="currency-digit"),
    pytest.param(body_for(("BAD-IN", 1), currency=978), 400, {"invalid_request"}, id="currency-number"),
    pytest.param(_without("currency"), 400, {"invalid_request"}, id="currency-missing"),
    pytest.param(body_for(("BAD-IN", 1), currency="USD"), 400, {"invalid_request"}, id="currency-mismatch"),
    # A missing provider is "auto" (payment routing, tests/test_routing.py).
    pytest.param(body_for(("BAD-IN", 1), provider=7), 400, {"invalid_request"}, id="provider-number"),
    pytest.param(body_for(("BAD-IN", 1), provider="paypal"), 400, {"invalid_request"}, id="provider-paypal"),
    pytest.param(body_for(("BAD-IN", 1), provider=None), 400, {"invalid_request"}, id="provider-null"),
    pytest.param(body_for(("BAD-IN", 1), customer="ada"), 400, {"invalid_request"}, id="customer-string"),
    pytest.param(
        body_for(("BAD-IN", 1), customer={"email": "ada\x00@example.com"}),
        400,
        {"invalid_request"},
        id="customer-email-nul-byte",
    ),
    pytest.param(body_for(("BAD-IN", 1), padding="x" * (1 << 20)), 413, {"body_too_large"}, id="over-1-MiB"),
]


@pytest.mark.parametrize(("body", "status", "codes"), BAD_BODIES)
def test_bad_checkout_input_is_refused_and_changes_nothing(
    client, fake_stripe, sessions, body, status, codes
):
    put_product(client, "BAD-IN", on_hand=5)
    # Something already held, so "unchanged" is not just "still zero".
    assert checkout(client, ("BAD-IN", 2)).status_code == 201
    fake_stripe.clear_requests()
    before = state(sessions)

    answer = answered(client, body)

    assert answer.status_code == status, answer.text
    assert answer.json["error"] in codes, answer.json
    assert isinstance(answer.json.get("detail"), str) and answer.json["detail"]
    assert state(sessions) == before
    assert product_row(sessions, "BAD-IN") == (5, 2)
    assert fake_stripe.requests == []


def test_unknown_sku_answer_names_the_sku(client, fake_stripe, sessions):
    put_product(client, "KNOWN", on_hand=5)
    answer = checkout(client, ("KNOWN", 1), ("GHOST-1", 1))
    assert answer.status_code == 400
    assert answer.json["error"] == "unknown_sku"
    assert answer.json["sku"] == "GHOST-1"
    assert product_row(sessions, "KNOWN") == (5, 0)
    assert fake_stripe.requests == []


# --------------------------------------------------------------------------- 4. insufficient stock


def test_a_short_second_line_refuses_the_order_and_leaves_the_first_line_untouched(
    client, fake_stripe, sessions
):
    put_product(client, "PLENTY", on_hand=5)
    put_product(client, "SCARCE", on_hand=2)
    before = state(sessions)

    # PLENTY sorts first, so it was reserved before SCARCE came up short.
    answer = checkout(client, ("SCARCE", 3), ("PLENTY", 3))

    assert answer.status_code == 409, answer.text
    assert answer.json["error"] == "insufficient_stock"
    assert (answer.json["sku"], answer.json["available"]) == ("SCARCE", 2)
    assert state(sessions) == before
    assert product_row(sessions, "PLENTY") == (5, 0)
    assert product_row(sessions, "SCARCE") == (2, 0)
    assert fake_stripe.requests == []


def test_a_short_first_line_names_what_is_still_available(client, fake_stripe, sessions):
    put_product(client, "ALPHA", on_hand=5)
    put_product(client, "OMEGA", on_hand=9)
    assert checkout(client, ("ALPHA", 4)).status_code == 201
    fake_stripe.clear_requests()
    before = state(sessions)

    answer = checkout(client, ("ALPHA", 3), ("OMEGA", 1))

    assert answer.status_code == 409, answer.text
    assert (answer.json["error"], answer.json["sku"], answer.json["available"]) == (
        "insufficient_stock",
        "ALPHA",
        1,
    )
    assert state(sessions) == before
    assert product_row(sessions, "OMEGA") == (9, 0)
    assert product_row(sessions, "ALPHA") == (5, 4)
    assert fake_stripe.requests == []


# --------------------------------------------------------------------------- 5. Stripe failing


@pytest.fixture
def impatient_client(env) -> Iterator[testing.TestClient]:
    """The app with a 1-second Stripe timeout."""
    parts = collaborators(load_settings({**env, "STRIPE_TIMEOUT_SECONDS": "1"}))
    yield testing.TestClient(create_app(parts))
    parts.engine.dispose()


def _break_stripe(fake_stripe, how: str) -> None:
    if how == "server-error":
        fake_stripe.fail_all(500)
    elif how == "card-declined":
        fake_stripe.fail_all(402, code="card_declined")
    else:
        fake_stripe.delay(2.5)


def _mend_stripe(fake_stripe) -> None:
    fake_stripe.heal()
    fake_stripe.delay(0)


@pytest.mark.parametrize("how", ["server-error", "card-declined", "timeout"])
def test_a_failing_stripe_gives_502_and_releases_the_stock(impatient_client, fake_stripe, sessions, how):
    client = impatient_client
    put_product(client, "FRAGILE", on_hand=6)
    assert checkout(client, ("FRAGILE", 1)).status_code == 201  # an earlier, healthy order
    fake_stripe.clear_requests()
    _break_stripe(fake_stripe, how)

    answer = checkout(client, ("FRAGILE", 2))

    assert answer.status_code == 502, answer.text
    assert answer.json["error"] == "provider_error"
    assert answer.json["detail"]
    assert product_row(sessions, "FRAGILE") == (6, 1)
    with sessions() as session:
        failed = session.execute(
            text(
                "SELECT o.id, o.status, p.status, p.provider_payment_id, p.id FROM orders o "
                "JOIN payments p ON p.order_id = o.id WHERE o.status <> 'pending_payment'"
            )
        ).all()
        assert len(failed) == 1, failed
        order_id, order_status, payment_status, intent_id, payment_id = failed[0]
        held = (
            session.execute(
                text("SELECT status FROM stock_reservations WHERE order_id = :id"), {"id": order_id}
            )
            .scalars()
            .all()
        )
    assert (order_status, payment_status) == ("failed", "failed")
    assert intent_id is None
    assert held and set(held) == {"released"}
    assert scalar(sessions, "SELECT count(*) FROM stock_reservations WHERE status = 'active'") == 1
    # Every try of the one call used the checkout's deterministic key.
    tries = creates(fake_stripe)
    assert tries and {r.idempotency_key for r in tries} == {f"payfleet-checkout-{payment_id}"}
    seen = order(client, str(order_id))
    assert (seen["status"], seen["payment"]["status"]) == ("failed", "failed")
    moves = [(e["subject"], e["from"], e["to"]) for e in seen["timeline"] if e["kind"] == "transition"]
    assert moves == [
        ("order", None, "pending_payment"),
        ("payment", "pending", "failed"),
        ("order", "pending_payment", "failed"),
    ]

    _mend_stripe(fake_stripe)
    retried = checkout(client, ("FRAGILE", 2))

    assert retried.status_code == 201, retried.text
    assert retried.json["order_id"] != str(order_id)
    assert fake_stripe.get(retried.json["payment"]["provider_payment_id"]) is not None
    assert product_row(sessions, "FRAGILE") == (6, 3)


def test_an_unreachable_stripe_gives_502_and_releases_the_stock(env, sessions):
    nowhere = {**env, "STRIPE_API_BASE": "http://127.0.0.1:9", "STRIPE_TIMEOUT_SECONDS": "1"}
    parts = collaborators(load_settings(nowhere))
    try:
        client = testing.TestClient(create_app(parts))
        put_product(client, "OFFLINE", on_hand=3)
        answer = checkout(client, ("OFFLINE", 2))
        assert answer.status_code == 502, answer.text
        assert answer.json["error"] == "provider_error"
        assert product_row(sessions, "OFFLINE") == (3, 0)
        assert scalar(sessions, "SELECT status FROM orders") == "failed"
    finally:
        parts.engine.dispose()
