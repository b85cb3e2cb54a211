"""An order's life after its payment, through the real app, PostgreSQL,
RabbitMQ and Dramatiq worker threads: pickup, completion, returns, a full
refund, and a payment that succeeds after its order expired (issue 3, item 7;
"Applying a status" in DESIGN.md). Every transition shows in the timeline."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from falcon import testing
from sqlalchemy import text

from domain.stock import release
from tests.conftest import scalar
from tests.support.shop import ADMIN, call, checkout, intent_event, order, place, put_product, race, settle
from tests.support.stripe_signing import stripe_event

# --------------------------------------------------------------------------- drivers


def act(client: testing.TestClient, order_id: str, action: str, **kwargs: Any) -> testing.Result:
    return call(client, "POST", f"/admin/orders/{order_id}/{action}", headers=ADMIN, **kwargs)


def give_back(client: testing.TestClient, order_id: str, *lines: tuple[str, int]) -> testing.Result:
    body = {"lines": [{"sku": sku, "quantity": quantity} for sku, quantity in lines]}
    return act(client, order_id, "return", json=body)


def pay(client: testing.TestClient, sessions, intent_id: str) -> int:
    return settle(client, sessions, intent_event("payment_intent.succeeded", intent_id))


def refund(client: testing.TestClient, sessions, intent_id: str, amount: int) -> int:
    charge = {
        "id": f"ch_{uuid.uuid4().hex[:24]}",
        "object": "charge",
        "payment_intent": intent_id,
        "amount": amount,
        "amount_refunded": amount,
        "refunded": True,
        "status": "succeeded",
    }
    return settle(client, sessions, stripe_event("charge.refunded", charge))


def statuses(client: testing.TestClient, order_id: str) -> tuple[str, str]:
    view = order(client, order_id)
    return view["status"], view["payment"]["status"]


def transitions(client: testing.TestClient, order_id: str) -> list[tuple[str, str | None, str]]:
    return [
        (t["subject"], t["from"], t["to"])
        for t in order(client, order_id)["timeline"]
        if t["kind"] == "transition"
    ]


def stock(sessions, sku: str) -> tuple[int, int]:
    with sessions() as session:
        on_hand, reserved = session.execute(
            text("SELECT on_hand, reserved FROM products WHERE sku = :sku"), {"sku": sku}
        ).one()
    return int(on_hand), int(reserved)


def movements(sessions, reference: str) -> list[tuple[str, str, int, int, int]]:
    """(sku, type, quantity, before, after) of the order's movements, oldest first."""
    with sessions() as session:
        rows = session.execute(
            text(
                "SELECT sku, type, quantity, on_hand_before, on_hand_after FROM stock_movements "
                "WHERE reference = :ref ORDER BY id"
            ),
            {"ref": reference},
        ).all()
    return [tuple(row) for row in rows]


def snapshot(sessions) -> dict[str, Any]:
    """Everything an admin action could change."""
    with sessions() as session:

        def rows(sql: str) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in session.execute(text(sql)).all()]

        return {
            "orders": rows("SELECT id, status, ready_at, completed_at FROM orders ORDER BY id"),
            "payments": rows("SELECT id, status FROM payments ORDER BY id"),
            "transitions": rows("SELECT id FROM order_transitions ORDER BY id"),
            "movements": rows("SELECT id FROM stock_movements ORDER BY id"),
            "reservations": rows("SELECT id, status FROM stock_reservations ORDER BY id"),
            "products": rows("SELECT sku, on_hand, reserved FROM products ORDER BY sku"),
        }


def times(sessions, order_id: str) -> tuple[datetime | None, datetime | None]:
    with sessions() as session:
        ready_at, completed_at = session.execute(
            text("SELECT ready_at, completed_at FROM orders WHERE id = :o"), {"o": order_id}
        ).one()
    return ready_at, completed_at


def expire(sessions, order_id: str) -> None:
    """What expire-stale-orders does to an unpaid order: expired, units released."""
    with sessions() as session:
        session.execute(text("UPDATE orders SET status = 'expired' WHERE id = :o"), {"o": order_id})
        release(session, uuid.UUID(order_id))
        session.commit()


@pytest.fixture
def shelf(client, fake_stripe, worker) -> None:
    """TEE 5 units at 15.00 EUR, CAP 3 at 9.00 EUR; a worker applies events."""
    put_product(client, "TEE", on_hand=5, price=1500)
    put_product(client, "CAP", on_hand=3, price=900)


@pytest.fixture
def paid(client, sessions, shelf) -> tuple[str, str]:
    """A paid order of 3 TEE and 2 CAP: TEE 2 and CAP 1 left on the shelf."""
    order_id, intent = place(client, ("TEE", 3), ("CAP", 2))
    pay(client, sessions, intent)
    assert statuses(client, order_id) == ("paid", "succeeded")
    assert (stock(sessions, "TEE"), stock(sessions, "CAP")) == ((2, 0), (1, 0))
    return order_id, intent


CHECKOUT_AND_PAYMENT = [
    ("order", None, "pending_payment"),
    ("payment", "pending", "succeeded"),
    ("order", "pending_payment", "paid"),
]


# --------------------------------------------------------------------------- 1. pickup and completion


def test_a_paid_order_goes_ready_for_pickup_then_completed(client, sessions, paid):
    order_id, _ = paid
    stock_before = (stock(sessions, "TEE"), stock(sessions, "CAP"))

    started = datetime.now(UTC)
    ready = act(client, order_id, "ready-for-pickup")
    assert ready.status_code == 200, ready.text
    assert ready.json["status"] == "ready_for_pickup"
    assert ready.json == order(client, order_id)

    completed = act(client, order_id, "complete")
    assert completed.status_code == 200, completed.text
    assert completed.json["status"] == "completed"
    finished = datetime.now(UTC)

    ready_at, completed_at = times(sessions, order_id)
    assert ready_at is not None and completed_at is not None
    assert started <= ready_at <= completed_at <= finished
    assert transitions(client, order_id) == [
        *CHECKOUT_AND_PAYMENT,
        ("order", "paid", "ready_for_pickup"),
        ("order", "ready_for_pickup", "completed"),
    ]
    timeline = order(client, order_id)["timeline"]
    assert [e["at"] for e in timeline] == sorted(e["at"] for e in timeline)
    assert (stock(sessions, "TEE"), stock(sessions, "CAP")) == stock_before
    assert [m[1] for m in movements(sessions, order_id)] == ["sale", "sale"]


def test_a_paid_order_can_be_completed_directly(client, sessions, paid):
    order_id, _ = paid

    completed = act(client, order_id, "complete")

    assert completed.status_code == 200, completed.text
    assert statuses(client, order_id) == ("completed", "succeeded")
    ready_at, completed_at = times(sessions, order_id)
    assert ready_at is None and completed_at is not None
    assert transitions(client, order_id) == [*CHECKOUT_AND_PAYMENT, ("order", "paid", "completed")]


def test_repeating_ready_or_complete_answers_200_and_adds_no_transition(client, sessions, paid):
    order_id, _ = paid
    assert act(client, order_id, "ready-for-pickup").status_code == 200
    before = snapshot(sessions)

    again = act(client, order_id, "ready-for-pickup")

    assert again.status_code == 200, again.text
    assert again.json["status"] == "ready_for_pickup"
    assert snapshot(sessions) == before

    assert act(client, order_id, "complete").status_code == 200
    before = snapshot(sessions)

    again = act(client, order_id, "complete")

    assert again.status_code == 200, again.text
    assert again.json["status"] == "completed"
    assert snapshot(sessions) == before
    assert transitions(client, order_id).count(("order", "ready_for_pickup", "completed")) == 1


def test_a_completed_order_cannot_go_back_to_ready_for_pickup(client, sessions, paid):
    order_id, _ = paid
    assert act(client, order_id, "complete").status_code == 200
    before = snapshot(sessions)

    answer = act(client, order_id, "ready-for-pickup")

    assert answer.status_code == 409, answer.text
    assert answer.json["error"] == "conflict"
    assert snapshot(sessions) == before


def _pending(client, sessions) -> str:
    return place(client, ("TEE", 1))[0]


def _expired(client, sessions) -> str:
    order_id = place(client, ("TEE", 1))[0]
    expire(sessions, order_id)
    return order_id


def _canceled(client, sessions) -> str:
    order_id, intent = place(client, ("TEE", 1))
    settle(client, sessions, intent_event("payment_intent.canceled", intent))
    return order_id


UNPAID = [
    pytest.param(_pending, "pending_payment", id="pending"),
    pytest.param(_expired, "expired", id="expired"),
    pytest.param(_canceled, "canceled", id="canceled"),
]


@pytest.mark.parametrize(("make", "status"), UNPAID)
@pytest.mark.parametrize("action", ["ready-for-pickup", "complete"])
def test_an_unpaid_order_can_be_neither_ready_nor_completed(client, sessions, shelf, make, status, action):
    order_id = make(client, sessions)
    before = snapshot(sessions)

    answer = act(client, order_id, action)

    assert answer.status_code == 409, answer.text
    assert answer.json["error"] == "conflict"
    assert answer.json["detail"]
    assert snapshot(sessions) == before
    assert order(client, order_id)["status"] == status


@pytest.mark.parametrize("action", ["ready-for-pickup", "complete", "return"])
@pytest.mark.parametrize("order_id", [str(uuid.uuid4()), "not-a-uuid"], ids=["unknown", "malformed"])
def test_an_unknown_order_is_404(client, action, order_id):
    body = {"lines": [{"sku": "TEE", "quantity": 1}]} if action == "return" else None
    answer = act(client, order_id, action, json=body)
    assert answer.status_code == 404, answer.text
    assert answer.json["error"] == "not_found"


@pytest.mark.parametrize("action", ["ready-for-pickup", "complete", "return"])
def test_order_actions_need_the_admin_token(client, sessions, paid, action):
    order_id, _ = paid
    before = snapshot(sessions)
    answer = call(client, "POST", f"/admin/orders/{order_id}/{action}", json={"lines": []})
    assert answer.status_code == 401, answer.text
    assert snapshot(sessions) == before


# --------------------------------------------------------------------------- 2. returns


def test_a_return_puts_units_back_with_a_return_movement(client, sessions, paid):
    order_id, _ = paid

    answer = give_back(client, order_id, ("TEE", 1))

    assert answer.status_code == 200, answer.text
    assert answer.json["id"] == order_id
    assert stock(sessions, "TEE") == (3, 0)
    assert stock(sessions, "CAP") == (1, 0)
    assert movements(sessions, order_id)[-1] == ("TEE", "return", 1, 2, 3)
    shown = [e for e in order(client, order_id)["timeline"] if e["kind"] == "movement"]
    assert [(e["sku"], e["type"], e["quantity"], e["before"], e["after"]) for e in shown] == [
        ("CAP", "sale", -2, 3, 1),
        ("TEE", "sale", -3, 5, 2),
        ("TEE", "return", 1, 2, 3),
    ]
    assert shown[-1]["reference"] == order_id
    assert shown[-1]["reason"]


def test_partial_returns_accumulate_up_to_what_was_sold(client, sessions, paid):
    order_id, _ = paid

    assert give_back(client, order_id, ("TEE", 1)).status_code == 200
    assert give_back(client, order_id, ("TEE", 1), ("CAP", 1)).status_code == 200
    assert give_back(client, order_id, ("TEE", 1), ("CAP", 1)).status_code == 200

    assert stock(sessions, "TEE") == (5, 0)
    assert stock(sessions, "CAP") == (3, 0)
    # Within one return the lines are applied in SKU order (the lock order).
    assert [m for m in movements(sessions, order_id) if m[1] == "return"] == [
        ("TEE", "return", 1, 2, 3),
        ("CAP", "return", 1, 1, 2),
        ("TEE", "return", 1, 3, 4),
        ("CAP", "return", 1, 2, 3),
        ("TEE", "return", 1, 4, 5),
    ]
    before = snapshot(sessions)
    refused = give_back(client, order_id, ("TEE", 1))
    assert refused.status_code == 409, refused.text
    assert snapshot(sessions) == before


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param((("TEE", 4),), id="more-than-sold"),
        pytest.param((("CAP", 2), ("CAP", 1)), id="repeated-line-adds-up-past-sold"),
        pytest.param((("TEE", 1), ("CAP", 3)), id="one-line-over-refuses-all"),
    ],
)
def test_returning_more_than_was_sold_is_409_and_changes_nothing(client, sessions, paid, lines):
    order_id, _ = paid
    before = snapshot(sessions)

    answer = give_back(client, order_id, *lines)

    assert answer.status_code == 409, answer.text
    assert answer.json["error"] == "conflict"
    assert snapshot(sessions) == before


def test_a_return_after_an_earlier_return_counts_both(client, sessions, paid):
    order_id, _ = paid
    assert give_back(client, order_id, ("TEE", 2)).status_code == 200
    before = snapshot(sessions)

    answer = give_back(client, order_id, ("TEE", 2))

    assert answer.status_code == 409, answer.text
    assert snapshot(sessions) == before


def test_a_sku_not_in_the_order_is_400_and_changes_nothing(client, sessions, paid):
    order_id, _ = paid
    put_product(client, "SCARF", on_hand=4)
    before = snapshot(sessions)

    for lines in ((("SCARF", 1),), (("NO-SUCH-SKU", 1),), (("TEE", 1), ("SCARF", 1))):
        answer = give_back(client, order_id, *lines)
        assert answer.status_code == 400, (lines, answer.text)
        assert answer.json["error"] == "invalid_request"
    assert snapshot(sessions) == before


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"lines": []}, id="no-lines"),
        pytest.param({}, id="no-lines-field"),
        pytest.param({"lines": [{"sku": "TEE", "quantity": 0}]}, id="zero"),
        pytest.param({"lines": [{"sku": "TEE", "quantity": -1}]}, id="negative"),
        pytest.param({"lines": [{"sku": "TEE", "quantity": "1"}]}, id="string-quantity"),
        pytest.param({"lines": [{"sku": "TEE"}]}, id="no-quantity"),
        pytest.param({"lines": [{"quantity": 1}]}, id="no-sku"),
        pytest.param({"lines": ["TEE"]}, id="not-an-object"),
        pytest.param({"lines": {"sku": "TEE", "quantity": 1}}, id="object-not-list"),
    ],
)
def test_a_malformed_return_is_400_and_changes_nothing(client, sessions, paid, body):
    order_id, _ = paid
    before = snapshot(sessions)

    answer = act(client, order_id, "return", json=body)

    assert answer.status_code == 400, answer.text
    assert snapshot(sessions) == before


def test_a_completed_order_can_still_take_a_return(client, sessions, paid):
    order_id, _ = paid
    assert act(client, order_id, "complete").status_code == 200

    answer = give_back(client, order_id, ("CAP", 2))

    assert answer.status_code == 200, answer.text
    assert stock(sessions, "CAP") == (3, 0)


@pytest.mark.parametrize(("make", "status"), UNPAID)
def test_a_return_on_an_unpaid_order_is_409_and_changes_nothing(client, sessions, shelf, make, status):
    order_id = make(client, sessions)
    before = snapshot(sessions)

    answer = give_back(client, order_id, ("TEE", 1))

    assert answer.status_code == 409, answer.text
    assert answer.json["error"] == "conflict"
    assert snapshot(sessions) == before
    assert order(client, order_id)["status"] == status


# --------------------------------------------------------------------------- 3. a full refund


def test_a_full_refund_refunds_payment_and_order_without_touching_stock(client, sessions, paid):
    order_id, intent = paid
    before = snapshot(sessions)

    event_id = refund(client, sessions, intent, amount=6300)

    assert statuses(client, order_id) == ("refunded", "refunded")
    after = snapshot(sessions)
    assert (after["products"], after["movements"], after["reservations"]) == (
        before["products"],
        before["movements"],
        before["reservations"],
    )
    assert transitions(client, order_id) == [
        *CHECKOUT_AND_PAYMENT,
        ("payment", "succeeded", "refunded"),
        ("order", "paid", "refunded"),
    ]
    refunded = [t for t in order(client, order_id)["timeline"] if t["kind"] == "transition"][-2:]
    assert {t["event_id"] for t in refunded} == {event_id}
    assert ("event", "charge.refunded") in [
        (e["kind"], e.get("type")) for e in order(client, order_id)["timeline"]
    ]


def test_a_refunded_order_still_takes_its_goods_back(client, sessions, paid):
    order_id, intent = paid
    refund(client, sessions, intent, amount=6300)

    answer = give_back(client, order_id, ("TEE", 3))

    assert answer.status_code == 200, answer.text
    assert stock(sessions, "TEE") == (5, 0)
    assert statuses(client, order_id) == ("refunded", "refunded")


# --------------------------------------------------------------------------- 4. success after expiry


def needs_attention(client: testing.TestClient) -> list[str]:
    answer = call(client, "GET", "/admin/orders", params={"status": "needs_attention"}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return [o["id"] for o in answer.json["orders"]]


def test_a_success_after_expiry_takes_the_stock_again_when_it_is_there(client, sessions, shelf):
    order_id, intent = place(client, ("TEE", 2), ("CAP", 1))
    expire(sessions, order_id)
    assert (stock(sessions, "TEE"), stock(sessions, "CAP")) == ((5, 0), (3, 0))

    event_id = pay(client, sessions, intent)

    assert statuses(client, order_id) == ("paid", "succeeded")
    assert movements(sessions, order_id) == [("CAP", "sale", -1, 3, 2), ("TEE", "sale", -2, 5, 3)]
    assert (stock(sessions, "TEE"), stock(sessions, "CAP")) == ((3, 0), (2, 0))
    assert transitions(client, order_id) == [
        ("order", None, "pending_payment"),
        ("payment", "pending", "succeeded"),
        ("order", "expired", "paid"),
    ]
    late = [t for t in order(client, order_id)["timeline"] if t["kind"] == "transition"][-1]
    assert late["event_id"] == event_id
    assert needs_attention(client) == []

    pay(client, sessions, intent)  # Stripe says it again: nothing more is sold
    assert len(movements(sessions, order_id)) == 2
    assert (stock(sessions, "TEE"), stock(sessions, "CAP")) == ((3, 0), (2, 0))


@pytest.mark.parametrize(
    "taken",
    [
        pytest.param((("TEE", 5), ("CAP", 3)), id="all-gone"),
        pytest.param((("TEE", 4),), id="one-line-short"),
    ],
)
def test_a_success_after_expiry_with_the_stock_gone_needs_attention(client, sessions, shelf, taken):
    order_id, intent = place(client, ("TEE", 2), ("CAP", 1))
    expire(sessions, order_id)
    other_id, _ = place(client, *taken)  # another customer holds the units now
    held = (stock(sessions, "TEE"), stock(sessions, "CAP"))

    event_id = pay(client, sessions, intent)

    assert statuses(client, order_id) == ("needs_attention", "succeeded")
    assert movements(sessions, order_id) == []  # all lines or none
    assert (stock(sessions, "TEE"), stock(sessions, "CAP")) == held
    assert order(client, other_id)["status"] == "pending_payment"
    assert needs_attention(client) == [order_id]
    payment = order(client, order_id)["payment"]
    assert (payment["status"], payment["amount"], payment["provider_payment_id"]) == (
        "succeeded",
        3900,
        intent,
    )
    assert transitions(client, order_id) == [
        ("order", None, "pending_payment"),
        ("payment", "pending", "succeeded"),
        ("order", "expired", "needs_attention"),
    ]
    late = [t for t in order(client, order_id)["timeline"] if t["kind"] == "transition"][-1]
    assert late["event_id"] == event_id
    assert late["reason"]


def test_the_order_list_filters_by_status(client, sessions, shelf):
    pending_id, _ = place(client, ("TEE", 1))
    paid_id, paid_intent = place(client, ("CAP", 1))
    pay(client, sessions, paid_intent)

    def listed(status: str) -> list[str]:
        answer = call(client, "GET", "/admin/orders", params={"status": status}, headers=ADMIN)
        assert answer.status_code == 200, answer.text
        return [o["id"] for o in answer.json["orders"]]

    assert listed("pending_payment") == [pending_id]
    assert listed("paid") == [paid_id]
    assert listed("needs_attention") == []
    bad = call(client, "GET", "/admin/orders", params={"status": "lost"}, headers=ADMIN)
    assert bad.status_code == 400, bad.text
    assert call(client, "GET", "/admin/orders", params={"status": "paid"}).status_code == 401


# --------------------------------------------------------------------------- found while testing


def test_an_order_that_never_sold_cannot_take_a_return_after_its_refund(client, sessions, shelf):
    """A success after expiry with the stock gone sells nothing (needs
    attention); the shop refunds the customer (the order becomes refunded).
    Nothing of it ever left the shelf, so a "return" must not put units back:
    today `refunded` is returnable whatever was sold, and the return creates
    stock from nothing."""
    order_id, intent = place(client, ("TEE", 2))
    expire(sessions, order_id)
    place(client, ("TEE", 5))
    pay(client, sessions, intent)
    assert statuses(client, order_id) == ("needs_attention", "succeeded")
    refund(client, sessions, intent, amount=3000)
    assert statuses(client, order_id) == ("refunded", "refunded")
    before = snapshot(sessions)

    answer = give_back(client, order_id, ("TEE", 2))

    assert answer.status_code == 409, f"units never sold were taken back: {answer.text}"
    assert snapshot(sessions) == before
    assert stock(sessions, "TEE") == (5, 5)
    assert scalar(sessions, "SELECT count(*) FROM stock_movements WHERE reference = :o", o=order_id) == 0


def test_concurrent_returns_listing_skus_in_any_order_all_succeed(client, sessions, fake_stripe, worker):
    """Returns apply their lines in SKU order, the lock order reservations
    use (domain/orders.py, record_return). Were they applied in the order the
    body lists them, two returns naming the same SKUs in opposite orders, or
    a return racing a checkout, would deadlock: PostgreSQL aborts one and the
    admin gets 503."""
    put_product(client, "TEE", on_hand=100)
    put_product(client, "CAP", on_hand=100)
    orders = []
    for _ in range(8):
        order_id, intent = place(client, ("TEE", 3), ("CAP", 3))
        pay(client, sessions, intent)
        orders.append(order_id)

    answers: list[Any] = []
    for _ in range(3):
        calls: list[Any] = []
        for i, order_id in enumerate(orders):
            lines = (("TEE", 1), ("CAP", 1)) if i % 2 else (("CAP", 1), ("TEE", 1))
            calls.append(lambda o=order_id, ls=lines: give_back(client, o, *ls))
            calls.append(lambda: checkout(client, ("TEE", 1), ("CAP", 1)))
        answers.extend(race(calls))

    assert all(isinstance(a, testing.Result) for a in answers), answers
    # Whatever was refused changed nothing: the ledger still reproduces on_hand.
    for sku in ("TEE", "CAP"):
        total = scalar(sessions, "SELECT sum(quantity) FROM stock_movements WHERE sku = :s", s=sku)
        assert total == stock(sessions, sku)[0]
    codes = sorted(a.status_code for a in answers)
    refused = [a.text for a in answers if a.status_code not in (200, 201)]
    assert codes == [200] * 24 + [201] * 24, f"{len(refused)} of {len(answers)} refused, e.g. {refused[:1]}"
