"""Carts against the real app and PostgreSQL: building one, its expiry, and
checking it out through POST /checkout with a `cart_id` (issue 3, item 3).

A cart reserves nothing; checkout consumes it once, in the order's own
transaction, so a refused checkout leaves it as it was (promises 4 and 8)."""

from __future__ import annotations

import time
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
from tests.support.shop import call, order, product, put_product, race

DAY = timedelta(hours=24)
SLACK = timedelta(seconds=10)


# --------------------------------------------------------------------------- drivers


def new_cart(client: testing.TestClient) -> dict[str, Any]:
    answer = call(client, "POST", "/carts")
    assert answer.status_code == 201, answer.text
    return dict(answer.json)


def get_cart(client: testing.TestClient, cart_id: str) -> testing.Result:
    return call(client, "GET", f"/carts/{cart_id}")


def set_line(client: testing.TestClient, cart_id: str, sku: str, quantity: Any) -> testing.Result:
    return call(client, "PUT", f"/carts/{cart_id}/items", json={"sku": sku, "quantity": quantity})


def filled_cart(client: testing.TestClient, *lines: tuple[str, int]) -> str:
    cart_id = str(new_cart(client)["id"])
    for sku, quantity in lines:
        answer = set_line(client, cart_id, sku, quantity)
        assert answer.status_code == 200, answer.text
    return cart_id


def checkout_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "provider": "stripe",
        "currency": "EUR",
        "customer": {"email": "ada@example.com", "phone": "+33600000000"},
    }
    body.update(fields)
    return body


def checkout_cart(client: testing.TestClient, cart_id: str) -> testing.Result:
    return call(client, "POST", "/checkout", json=checkout_body(cart_id=cart_id))


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def expire(sessions, cart_id: str) -> None:
    with sessions() as session:
        session.execute(
            text("UPDATE carts SET expires_at = now() - interval '1 second' WHERE id = :id"), {"id": cart_id}
        )
        session.commit()


def stock(sessions, sku: str) -> tuple[int, int]:
    with sessions() as session:
        on_hand, reserved = session.execute(
            text("SELECT on_hand, reserved FROM products WHERE sku = :sku"), {"sku": sku}
        ).one()
    return int(on_hand), int(reserved)


def state(sessions) -> dict[str, Any]:
    """Everything a cart or a checkout could change."""
    with sessions() as session:

        def rows(sql: str) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in session.execute(text(sql)).all()]

        return {
            "carts": rows("SELECT id, expires_at, order_id, checked_out_at FROM carts ORDER BY id"),
            "cart_items": rows("SELECT cart_id, sku, quantity FROM cart_items ORDER BY cart_id, sku"),
            "orders": rows("SELECT id, status FROM orders ORDER BY id"),
            "payments": rows("SELECT id, status FROM payments ORDER BY id"),
            "reservations": rows(
                "SELECT order_id, sku, quantity, status FROM stock_reservations ORDER BY id"
            ),
            "movements": rows("SELECT id FROM stock_movements ORDER BY id"),
            "products": rows("SELECT sku, on_hand, reserved FROM products ORDER BY sku"),
        }


@pytest.fixture
def shelf(client, fake_stripe) -> None:
    """TEE 10 units at 15.00 EUR, CAP 4 at 9.00 EUR."""
    put_product(client, "TEE", on_hand=10, price=1500)
    put_product(client, "CAP", on_hand=4, price=900)


# --------------------------------------------------------------------------- 1. building a cart


def test_a_new_cart_is_empty_and_expires_a_day_ahead(client, sessions):
    before = datetime.now(UTC)
    answer = call(client, "POST", "/carts")
    after = datetime.now(UTC)

    assert answer.status_code == 201, answer.text
    cart = answer.json
    uuid.UUID(cart["id"])
    assert (cart["items"], cart["order_id"], cart["expired"]) == ([], None, False)
    assert before + DAY - SLACK <= at(cart["expires_at"]) <= after + DAY + SLACK
    assert get_cart(client, cart["id"]).json == cart
    assert scalar(sessions, "SELECT count(*) FROM carts") == 1


def test_lines_are_set_changed_and_removed_and_each_change_pushes_the_expiry(client, sessions, shelf):
    cart_id = str(new_cart(client)["id"])
    seen = [at(get_cart(client, cart_id).json["expires_at"])]

    def change(sku: str, quantity: int) -> list[dict[str, Any]]:
        time.sleep(0.02)  # so that "later" is visible in the timestamp
        start = datetime.now(UTC)
        answer = set_line(client, cart_id, sku, quantity)
        assert answer.status_code == 200, answer.text
        expires = at(answer.json["expires_at"])
        assert expires > seen[-1], "a change did not push the expiry forward"
        assert start + DAY - SLACK <= expires <= datetime.now(UTC) + DAY + SLACK
        seen.append(expires)
        assert answer.json == get_cart(client, cart_id).json
        assert answer.json["order_id"] is None
        return list(answer.json["items"])

    tee = {"sku": "TEE", "unit_price": 1500, "currency": "EUR"}
    cap = {"sku": "CAP", "unit_price": 900, "currency": "EUR"}
    assert change("TEE", 2) == [{**tee, "quantity": 2}]
    assert change("CAP", 1) == [{**cap, "quantity": 1}, {**tee, "quantity": 2}]
    assert change("TEE", 5) == [{**cap, "quantity": 1}, {**tee, "quantity": 5}]
    assert change("CAP", 0) == [{**tee, "quantity": 5}]
    assert change("CAP", 0) == [{**tee, "quantity": 5}]  # removing an absent line is harmless
    assert change("TEE", 0) == []

    assert scalar(sessions, "SELECT count(*) FROM cart_items") == 0


def test_a_cart_shows_the_current_catalogue_price(client, shelf):
    cart_id = filled_cart(client, ("TEE", 2))
    put_product(client, "TEE", on_hand=10, price=1700)

    assert get_cart(client, cart_id).json["items"] == [
        {"sku": "TEE", "quantity": 2, "unit_price": 1700, "currency": "EUR"}
    ]


def test_an_unknown_sku_is_400_and_changes_nothing(client, sessions, shelf):
    cart_id = filled_cart(client, ("TEE", 1))
    before, view = state(sessions), get_cart(client, cart_id).json

    answer = set_line(client, cart_id, "NO-SUCH-SKU", 1)

    assert answer.status_code == 400, answer.text
    assert answer.json["error"] == "unknown_sku"
    assert answer.json["detail"]
    assert state(sessions) == before
    assert get_cart(client, cart_id).json == view


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"sku": "TEE", "quantity": -1}, id="negative"),
        pytest.param({"sku": "TEE", "quantity": 10_001}, id="too-many"),
        pytest.param({"sku": "TEE", "quantity": 2**63}, id="huge"),
        pytest.param({"sku": "TEE", "quantity": 1.5}, id="fraction"),
        pytest.param({"sku": "TEE", "quantity": "2"}, id="string"),
        pytest.param({"sku": "TEE", "quantity": True}, id="boolean"),
        pytest.param({"sku": "TEE", "quantity": None}, id="null"),
        pytest.param({"sku": "TEE"}, id="no-quantity"),
        pytest.param({"quantity": 1}, id="no-sku"),
        pytest.param({"sku": "", "quantity": 1}, id="empty-sku"),
        pytest.param({"sku": "T" * 65, "quantity": 1}, id="long-sku"),
        pytest.param({"sku": 7, "quantity": 1}, id="numeric-sku"),
        pytest.param({"sku": "TEE\x00", "quantity": 1}, id="nul-in-sku"),
        pytest.param([{"sku": "TEE", "quantity": 1}], id="array"),
        pytest.param(b"{not json", id="not-json"),
    ],
)
def test_a_bad_line_is_400_and_changes_nothing(client, sessions, shelf, body):
    cart_id = filled_cart(client, ("TEE", 1))
    before, view = state(sessions), get_cart(client, cart_id).json

    if isinstance(body, bytes):
        answer = call(
            client,
            "PUT",
            f"/carts/{cart_id}/items",
            body=body,
            headers={"Content-Type": "application/json"},
        )
    else:
        answer = call(client, "PUT", f"/carts/{cart_id}/items", json=body)

    assert answer.status_code == 400, answer.text
    assert answer.json["error"]
    assert answer.json["detail"]
    assert state(sessions) == before
    assert get_cart(client, cart_id).json == view


BAD_CART_IDS = [
    pytest.param(str(uuid.uuid4()), id="unknown"),
    pytest.param("not-a-uuid", id="not-a-uuid"),
    pytest.param("12345", id="number"),
    pytest.param("00000000-0000-0000-0000-00000000000g", id="bad-hex"),
]


@pytest.mark.parametrize("cart_id", BAD_CART_IDS)
def test_an_unknown_or_malformed_cart_is_404_everywhere(client, sessions, shelf, cart_id):
    filled_cart(client, ("TEE", 1))
    before = state(sessions)

    answers = {
        "get": get_cart(client, cart_id),
        "put": set_line(client, cart_id, "TEE", 1),
        "checkout": checkout_cart(client, cart_id),
    }

    for name, answer in answers.items():
        assert answer.status_code == 404, (name, answer.text)
        assert answer.json["error"] == "not_found", name
    assert state(sessions) == before


# --------------------------------------------------------------------------- 2. expiry


def test_an_expired_cart_is_gone_for_changes_and_checkout_and_reserves_nothing(
    client, sessions, fake_stripe, shelf
):
    cart_id = filled_cart(client, ("TEE", 2), ("CAP", 1))
    expire(sessions, cart_id)
    before = state(sessions)

    changed = set_line(client, cart_id, "TEE", 3)
    checked_out = checkout_cart(client, cart_id)

    for answer in (changed, checked_out):
        assert answer.status_code == 410, answer.text
        assert answer.json["error"] == "gone"
        assert answer.json["detail"]
    assert state(sessions) == before
    assert (stock(sessions, "TEE"), stock(sessions, "CAP")) == ((10, 0), (4, 0))
    assert fake_stripe.requests == []
    view = get_cart(client, cart_id).json
    assert (view["expired"], view["order_id"]) == (True, None)


@pytest.fixture
def short_lived_client(env) -> Iterator[testing.TestClient]:
    """The app with CART_TTL_SECONDS=1."""
    parts = collaborators(load_settings({**env, "CART_TTL_SECONDS": "1"}))
    yield testing.TestClient(create_app(parts))
    parts.engine.dispose()


def test_a_cart_expires_its_configured_ttl_after_the_last_change(short_lived_client, sessions, fake_stripe):
    client = short_lived_client
    put_product(client, "TEE", on_hand=10)
    start = datetime.now(UTC)
    cart_id = filled_cart(client, ("TEE", 2))
    expires = at(get_cart(client, cart_id).json["expires_at"])
    assert start < expires <= datetime.now(UTC) + timedelta(seconds=1)

    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.2)
    before = state(sessions)

    assert get_cart(client, cart_id).json["expired"] is True
    changed = set_line(client, cart_id, "TEE", 1)
    checked_out = checkout_cart(client, cart_id)

    assert (changed.status_code, changed.json["error"]) == (410, "gone"), changed.text
    assert (checked_out.status_code, checked_out.json["error"]) == (410, "gone"), checked_out.text
    assert state(sessions) == before
    assert stock(sessions, "TEE") == (10, 0)
    assert fake_stripe.requests == []


# --------------------------------------------------------------------------- 3. checkout


def test_checking_out_a_cart_reserves_its_lines_and_consumes_it(client, sessions, fake_stripe, shelf):
    cart_id = filled_cart(client, ("TEE", 3), ("CAP", 2))

    answer = checkout_cart(client, cart_id)

    assert answer.status_code == 201, answer.text
    order_id = answer.json["order_id"]
    assert answer.json["status"] == "pending_payment"
    assert answer.json["payment"]["client_secret"]
    assert stock(sessions, "TEE") == (10, 3)
    assert stock(sessions, "CAP") == (4, 2)
    placed = order(client, order_id)
    assert placed["lines"] == [
        {"sku": "CAP", "quantity": 2, "unit_price": 900},
        {"sku": "TEE", "quantity": 3, "unit_price": 1500},
    ]
    assert placed["total_amount"] == 6300
    assert get_cart(client, cart_id).json["order_id"] == order_id
    with sessions() as session:
        held = session.execute(
            text("SELECT sku, quantity, status FROM stock_reservations WHERE order_id = :o ORDER BY sku"),
            {"o": order_id},
        ).all()
    assert [tuple(row) for row in held] == [("CAP", 2, "active"), ("TEE", 3, "active")]
    assert scalar(sessions, "SELECT checked_out_at IS NOT NULL FROM carts WHERE id = :c", c=cart_id)


def test_a_cart_checks_out_once(client, sessions, fake_stripe, shelf):
    cart_id = filled_cart(client, ("TEE", 3))
    first = checkout_cart(client, cart_id)
    assert first.status_code == 201, first.text
    fake_stripe.clear_requests()
    before = state(sessions)

    again = checkout_cart(client, cart_id)
    changed = set_line(client, cart_id, "CAP", 1)

    for answer in (again, changed):
        assert answer.status_code == 409, answer.text
        assert answer.json["error"] == "conflict"
        assert answer.json["order_id"] == first.json["order_id"]
    assert state(sessions) == before
    assert stock(sessions, "TEE") == (10, 3)
    assert fake_stripe.requests == []


def test_two_concurrent_checkouts_of_one_cart_make_one_order(client, sessions, fake_stripe, shelf):
    cart_id = filled_cart(client, ("TEE", 3), ("CAP", 1))

    results = race([lambda: checkout_cart(client, cart_id) for _ in range(8)])

    codes = sorted(r.status_code for r in results)
    assert codes == [201] + [409] * 7, [(r.status_code, r.text) for r in results]
    (won,) = [r for r in results if r.status_code == 201]
    assert {r.json["error"] for r in results if r.status_code == 409} == {"conflict"}
    assert stock(sessions, "TEE") == (10, 3)
    assert stock(sessions, "CAP") == (4, 1)
    assert scalar(sessions, "SELECT count(*) FROM orders") == 1
    assert scalar(sessions, "SELECT count(*) FROM stock_reservations") == 2
    assert get_cart(client, cart_id).json["order_id"] == won.json["order_id"]


def test_a_cart_short_of_stock_is_refused_and_stays_open_until_restocked(
    client, sessions, fake_stripe, shelf
):
    cart_id = filled_cart(client, ("TEE", 2), ("CAP", 5))  # CAP has 4
    before = state(sessions)

    short = checkout_cart(client, cart_id)

    assert short.status_code == 409, short.text
    assert (short.json["error"], short.json["sku"], short.json["available"]) == (
        "insufficient_stock",
        "CAP",
        4,
    )
    assert state(sessions) == before
    assert get_cart(client, cart_id).json["order_id"] is None
    assert fake_stripe.requests == []

    put_product(client, "CAP", on_hand=6, price=900)
    again = checkout_cart(client, cart_id)

    assert again.status_code == 201, again.text
    assert get_cart(client, cart_id).json["order_id"] == again.json["order_id"]
    assert stock(sessions, "CAP") == (6, 5)
    assert stock(sessions, "TEE") == (10, 2)


def test_a_cart_in_another_currency_is_refused_and_stays_open(client, sessions, fake_stripe, shelf):
    cart_id = filled_cart(client, ("TEE", 1))
    before = state(sessions)

    answer = call(client, "POST", "/checkout", json=checkout_body(cart_id=cart_id, currency="USD"))

    assert answer.status_code == 400, answer.text
    assert state(sessions) == before
    assert get_cart(client, cart_id).json["order_id"] is None


def test_carts_reserve_nothing(client, sessions, fake_stripe, shelf):
    for _ in range(3):
        filled_cart(client, ("TEE", 10), ("CAP", 4))  # three carts, each wanting everything

    assert stock(sessions, "TEE") == (10, 0)
    assert stock(sessions, "CAP") == (4, 0)
    assert (product(client, "TEE")["available"], product(client, "CAP")["available"]) == (10, 4)
    assert scalar(sessions, "SELECT count(*) FROM stock_reservations") == 0
    body = checkout_body(items=[{"sku": "TEE", "quantity": 10}, {"sku": "CAP", "quantity": 4}])
    assert call(client, "POST", "/checkout", json=body).status_code == 201


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(lambda c: {"items": [{"sku": "TEE", "quantity": 1}], "cart_id": c}, id="both"),
        pytest.param(lambda c: {"items": [], "cart_id": c}, id="empty-items-and-cart"),
        pytest.param(lambda c: {}, id="neither"),
        pytest.param(lambda c: {"cart_id": None, "items": None}, id="both-null"),
        pytest.param(lambda c: {"cart_id": 12}, id="numeric-cart-id"),
        pytest.param(lambda c: {"cart_id": [c]}, id="list-cart-id"),
    ],
)
def test_checkout_needs_exactly_one_of_items_and_cart_id(client, sessions, fake_stripe, shelf, fields):
    cart_id = filled_cart(client, ("TEE", 1))
    body = checkout_body(**fields(cart_id))
    before = state(sessions)

    answer = call(client, "POST", "/checkout", json=body)

    assert answer.status_code == 400, answer.text
    assert answer.json["error"]
    assert state(sessions) == before
    assert fake_stripe.requests == []


@pytest.mark.parametrize("emptied", [False, True], ids=["never-filled", "emptied"])
def test_an_empty_cart_cannot_be_checked_out(client, sessions, fake_stripe, shelf, emptied):
    cart_id = filled_cart(client, ("TEE", 2)) if emptied else str(new_cart(client)["id"])
    if emptied:
        assert set_line(client, cart_id, "TEE", 0).status_code == 200
    before = state(sessions)

    answer = checkout_cart(client, cart_id)

    assert answer.status_code == 400, answer.text
    assert answer.json["error"] == "invalid_request"
    assert state(sessions) == before
    assert get_cart(client, cart_id).json["order_id"] is None
    assert fake_stripe.requests == []


# --------------------------------------------------------------------------- a payment that never started


def test_a_cart_whose_payment_could_not_start_can_be_checked_out_again(client, sessions, fake_stripe, shelf):
    """A refused checkout (short of stock) leaves the cart open; so does a
    checkout whose payment never started (Stripe refuses: 502, the order
    failed and its stock released), so the customer can retry."""
    cart_id = filled_cart(client, ("TEE", 2))
    fake_stripe.fail_all(402, code="card_declined")

    failed = checkout_cart(client, cart_id)

    assert failed.status_code == 502, failed.text
    assert stock(sessions, "TEE") == (10, 0)
    fake_stripe.heal()
    retried = checkout_cart(client, cart_id)
    assert retried.status_code == 201, f"the cart stayed consumed by a failed order: {retried.text}"
    assert stock(sessions, "TEE") == (10, 2)
