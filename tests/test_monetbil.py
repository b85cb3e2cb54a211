"""Monetbil mobile money against real PostgreSQL and RabbitMQ and a fake
Monetbil on 127.0.0.1: what a callback must prove before it is stored, what
check-payment must confirm before money moves, how an outage or a duplicate
is absorbed, how the payment is found, and what a failed checkout leaves
behind. Outcomes only: status codes, rows, stock and the fake's counters."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from falcon import testing
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from ingress.app import collaborators, create_app
from payfleet.platform.config import load_settings
from tests.conftest import ADMIN_TOKEN, MONETBIL_SECRET, eventually, scalar
from tests.fakes.monetbil_server import CHECK_PATH, WIDGET_PREFIX, FakeMonetbil
from tests.support.monetbil_signing import sign_monetbil
from tests.support.shop import monetbil_checkout, order, post_callback, product, put_product

LIMIT = 1024 * 1024  # the default MAX_BODY_BYTES
PRICE = 5000
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
DISAGREEMENTS = "payfleet_monetbil_disagreements_total"

# Every field of a real callback, as the fake signs it (signing needs no running server).
CALLBACK_FIELDS = sorted(FakeMonetbil(service_secret=MONETBIL_SECRET).pay("probe", amount="1000"))


# --- helpers ------------------------------------------------------------------


def place(client: testing.TestClient, *lines: tuple[str, int], on_hand: int = 5) -> str:
    """Stock each SKU (XAF) and check out `lines` through Monetbil; the order's id."""
    for sku, _ in lines:
        put_product(client, sku, on_hand=on_hand, currency="XAF", price=PRICE)
    answer = monetbil_checkout(client, *lines)
    assert answer.status_code == 201, answer.text
    return str(answer.json["order_id"])


def resign(form: dict[str, str], secret: str = MONETBIL_SECRET, **changes: str | None) -> dict[str, str]:
    """`form` with `changes` (None drops a field), signed again as Monetbil would."""
    fields = {name: value for name, value in form.items() if name != "sign"}
    for name, value in changes.items():
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    return {**fields, "sign": sign_monetbil(fields, secret)}


def post_raw(client: testing.TestClient, body: bytes | str) -> testing.Result:
    return client.simulate_post("/webhooks/monetbil", body=body, headers=FORM)


def event_rows(sessions: sessionmaker[Session]) -> int:
    return int(scalar(sessions, "SELECT count(*) FROM provider_events"))


def event_of(sessions: sessionmaker[Session], form: dict[str, str]) -> dict[str, Any]:
    key = f"{form['transaction_id']}:{form['status'].strip().lower()}"
    with sessions() as session:
        row = session.execute(
            text("SELECT status, attempts, last_error FROM provider_events WHERE event_key = :k"), {"k": key}
        )
        return dict(row.mappings().one())


def settled(sessions: sessionmaker[Session], form: dict[str, str], timeout: float = 15.0) -> dict[str, Any]:
    """The callback's event once the worker is done with it."""
    return eventually(lambda: (e := event_of(sessions, form))["status"] != "received" and e, timeout)  # type: ignore[no-any-return]


def state(client: testing.TestClient, sessions: sessionmaker[Session], order_id: str) -> dict[str, Any]:
    """Everything an event may change about one order: statuses, stock, ledger."""
    view = order(client, order_id)
    skus = [line["sku"] for line in view["lines"]]
    return {
        "order": view["status"],
        "payment": view["payment"]["status"],
        "stock": {sku: (product(client, sku)["on_hand"], product(client, sku)["reserved"]) for sku in skus},
        "reservations": sorted(
            row[0]
            for row in _rows(
                sessions, "SELECT status FROM stock_reservations WHERE order_id = :o", o=uuid.UUID(order_id)
            )
        ),
        "sales": scalar(
            sessions,
            "SELECT count(*) FROM stock_movements WHERE type = 'sale' AND reference = :r",
            r=order_id,
        ),
    }


def _rows(sessions: sessionmaker[Session], sql: str, **params: Any) -> list[Any]:
    with sessions() as session:
        return list(session.execute(text(sql), params).all())


def payment_ids(sessions: sessionmaker[Session], order_id: str) -> tuple[str | None, str | None]:
    row = _rows(
        sessions,
        "SELECT provider_payment_id, provider_reference FROM payments WHERE order_id = :o",
        o=uuid.UUID(order_id),
    )[0]
    return row[0], row[1]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def held(sku_quantities: dict[str, int], on_hand: int = 5) -> dict[str, tuple[int, int]]:
    return {sku: (on_hand, quantity) for sku, quantity in sku_quantities.items()}


def released(skus: list[str], on_hand: int = 5) -> dict[str, tuple[int, int]]:
    return {sku: (on_hand, 0) for sku in skus}


# --- 1. what a callback must prove before it is stored ----------------------------


def test_a_callback_signed_the_monetbil_way_is_stored_and_answered_received(client, fake_monetbil, sessions):
    order_id = place(client, ("PAGNE", 2))
    form = fake_monetbil.pay(order_id)

    answer = post_callback(client, form)

    assert (answer.status_code, answer.text) == (200, "received")
    rows = _rows(sessions, "SELECT provider, event_key, event_type, provider_payment_id FROM provider_events")
    assert [tuple(r) for r in rows] == [
        ("monetbil", f"{form['transaction_id']}:success", "success", form["transaction_id"])
    ]


def test_the_tamper_cases_cover_every_field_of_a_real_callback(fake_monetbil):
    assert sorted(fake_monetbil.pay("probe", amount="1000")) == CALLBACK_FIELDS
    assert "sign" in CALLBACK_FIELDS and len(CALLBACK_FIELDS) > 10


@pytest.mark.parametrize("mode", ["appended", "replaced"])
@pytest.mark.parametrize("field", CALLBACK_FIELDS)
def test_every_single_field_tamper_is_refused_and_stores_nothing(
    client, fake_monetbil, sessions, field, mode
):
    order_id = place(client, ("PAGNE", 2))
    form = fake_monetbil.pay(order_id)
    value = form[field]
    changed = value + "9" if mode == "appended" else (value[:-1] + ("0" if value[-1:] != "0" else "1"))
    assert changed != value

    answer = post_callback(client, {**form, field: changed})

    assert answer.status_code == 403, answer.text
    assert answer.json["error"] == "bad_signature"
    assert event_rows(sessions) == 0
    # The genuine callback still goes through: the refusal was the tamper's.
    assert post_callback(client, form).status_code == 200
    assert event_rows(sessions) == 1


@pytest.mark.parametrize("sign", [None, ""], ids=["absent", "blank"])
def test_a_callback_without_sign_is_refused(client, fake_monetbil, sessions, sign):
    form = fake_monetbil.pay(place(client, ("PAGNE", 1)))
    unsigned = {k: v for k, v in form.items() if k != "sign"}
    if sign is not None:
        unsigned["sign"] = sign

    answer = post_callback(client, unsigned)

    assert (answer.status_code, answer.json["error"]) == (403, "missing_signature")
    assert event_rows(sessions) == 0


def test_a_callback_signed_with_another_secret_is_refused(client, fake_monetbil, sessions):
    form = fake_monetbil.pay(place(client, ("PAGNE", 1)), secret="svc_someone_elses_secret")

    answer = post_callback(client, form)

    assert (answer.status_code, answer.json["error"]) == (403, "bad_signature")
    assert event_rows(sessions) == 0


def test_an_added_unsigned_field_is_refused(client, fake_monetbil, sessions):
    form = fake_monetbil.pay(place(client, ("PAGNE", 1)))

    answer = post_callback(client, {**form, "zz_extra": "1"})

    assert (answer.status_code, answer.json["error"]) == (403, "bad_signature")
    assert event_rows(sessions) == 0


@pytest.mark.parametrize(
    "repeat",
    ["status=success", "status=failed", "sign={sign}", "transaction_id={transaction_id}"],
)
def test_a_repeated_field_is_malformed(client, fake_monetbil, sessions, repeat):
    form = fake_monetbil.pay(place(client, ("PAGNE", 1)))

    answer = post_raw(client, urlencode(form) + "&" + repeat.format(**form))

    assert (answer.status_code, answer.json["error"]) == (400, "malformed_body")
    assert event_rows(sessions) == 0


@pytest.mark.parametrize(
    "body",
    [
        b'{"transaction_id": "1", "status": "success", "sign": "x"}',
        b"just some text",
        b"\xff\xfe\x00\x01",
        b"",
        b"status=success&&sign=x",
        b"<xml><status>success</status></xml>",
    ],
    ids=["json", "text", "binary", "empty", "empty-pair", "xml"],
)
def test_a_body_that_is_not_a_form_is_refused_and_stores_nothing(client, sessions, body):
    answer = post_raw(client, body)

    assert answer.status_code in (400, 403), answer.text
    assert event_rows(sessions) == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"transaction_id": None},
        {"status": None},
        {"transaction_id": ""},
        {"status": ""},
        {"status": "   "},
    ],
    ids=["no-transaction", "no-status", "blank-transaction", "blank-status", "spaces-status"],
)
def test_a_signed_callback_without_transaction_or_status_is_malformed(
    client, fake_monetbil, sessions, changes
):
    form = resign(fake_monetbil.pay(place(client, ("PAGNE", 1))), **changes)

    answer = post_callback(client, form)

    assert (answer.status_code, answer.json["error"]) == (400, "invalid_request")
    assert event_rows(sessions) == 0


@pytest.mark.parametrize("where", ["value", "name"])
def test_a_nul_byte_is_malformed(client, fake_monetbil, sessions, where):
    form = fake_monetbil.pay(place(client, ("PAGNE", 1)))
    form = resign(form, first_name="Am\x00a") if where == "value" else resign(form, **{"x\x00y": "1"})

    answer = post_callback(client, form)

    assert (answer.status_code, answer.json["error"]) == (400, "malformed_body")
    assert event_rows(sessions) == 0


def _padded(form: dict[str, str], size: int) -> bytes:
    """`form`, signed again with `first_name` padded so the body is exactly `size` bytes."""
    bare = len(urlencode(resign(form, first_name="")))
    body = urlencode(resign(form, first_name="a" * (size - bare))).encode()
    assert len(body) == size
    return body


def test_a_body_over_the_limit_is_refused_413_and_one_at_the_limit_is_taken(client, fake_monetbil, sessions):
    form = fake_monetbil.pay(place(client, ("PAGNE", 1)))

    over = post_raw(client, _padded(form, LIMIT + 1))
    assert (over.status_code, over.json["error"]) == (413, "body_too_large")
    assert event_rows(sessions) == 0

    at = post_raw(client, _padded(form, LIMIT))
    assert (at.status_code, at.text) == (200, "received")
    assert event_rows(sessions) == 1


# --- 2. a forged success --------------------------------------------------------


@pytest.mark.parametrize(
    ("check_status", "payment", "order_status"),
    [(0, "failed", "failed"), (-1, "canceled", "canceled")],
    ids=["check-says-failed", "check-says-cancelled"],
)
def test_a_forged_success_never_pays_the_order(
    client, fake_monetbil, worker, sessions, check_status, payment, order_status
):
    order_id = place(client, ("PAGNE", 2), ("WAX", 1))
    form = fake_monetbil.pay(order_id, status="success")
    fake_monetbil.set_transaction(form["transaction_id"], check_status)
    before = metric(DISAGREEMENTS)

    assert post_callback(client, form).text == "received"
    event = settled(sessions, form)

    assert state(client, sessions, order_id) == {
        "order": order_status,
        "payment": payment,
        "stock": released(["PAGNE", "WAX"]),
        "reservations": ["released", "released"],
        "sales": 0,
    }
    assert "check-payment says" in event["last_error"] and payment in event["last_error"]
    assert metric(DISAGREEMENTS) == before + 1
    assert fake_monetbil.checks(form["transaction_id"]) >= 1


def test_a_forged_success_for_no_payment_is_counted_once(client, fake_monetbil, worker, sessions):
    """One contradicted callback is one disagreement, however often its
    message is retried (here: its payment never appears)."""
    form = fake_monetbil.pay(str(uuid.uuid4()), amount="5000")
    fake_monetbil.set_transaction(form["transaction_id"], 0)
    before = metric(DISAGREEMENTS)

    assert post_callback(client, form).text == "received"

    assert settled(sessions, form)["status"] == "unmatched"
    assert metric(DISAGREEMENTS) == before + 1


def test_an_underpaid_success_never_pays_the_order(client, fake_monetbil, worker, sessions):
    """A genuine Monetbil transaction for 1 XAF naming our order (anyone with
    the public service key can start one) is confirmed by check-payment, but
    it is not the order's money."""
    order_id = place(client, ("PAGNE", 2))
    form = fake_monetbil.pay(order_id, status="success", amount="1")
    assert fake_monetbil.transaction(form["transaction_id"])["amount"] == 1

    assert post_callback(client, form).text == "received"
    settled(sessions, form)

    after = state(client, sessions, order_id)
    assert after["order"] != "paid" and after["payment"] != "succeeded"
    assert after["sales"] == 0


# --- 3. check-payment does not know the transaction --------------------------------


def _unknown_success(
    client: testing.TestClient, fake: FakeMonetbil, order_id: str, how: str
) -> dict[str, str]:
    if how == "after-pending":
        pending = fake.pay(order_id, status="pending")
        assert post_callback(client, pending).text == "received"
        return resign(pending, status="success", message="Payment successful")
    known = fake.pay(order_id, status="success")
    return resign(known, transaction_id=f"{known['transaction_id']}404")


@pytest.mark.parametrize("how", ["after-pending", "never-set"])
def test_a_success_check_payment_does_not_know_is_retried_then_failed_never_paid(
    client, fake_monetbil, worker, sessions, how
):
    order_id = place(client, ("PAGNE", 2))
    form = _unknown_success(client, fake_monetbil, order_id, how)
    assert fake_monetbil.transaction(form["transaction_id"]) is None

    assert post_callback(client, form).text == "received"
    event = settled(sessions, form)

    assert event["status"] == "failed"
    assert event["last_error"].startswith("PaymentNotConfirmed")
    assert fake_monetbil.checks(form["transaction_id"]) == 3
    after = state(client, sessions, order_id)
    assert (after["order"], after["stock"], after["reservations"], after["sales"]) == (
        "pending_payment",
        held({"PAGNE": 2}),
        ["active"],
        0,
    )
    assert after["payment"] == ("processing" if how == "after-pending" else "pending")


# --- 4. a check-payment outage ---------------------------------------------------


def test_a_check_payment_outage_is_retried_with_backoff_then_paid(client, fake_monetbil, worker, sessions):
    order_id = place(client, ("PAGNE", 2))
    form = fake_monetbil.pay(order_id)
    fake_monetbil.check_fail_next(2, 500)

    assert post_callback(client, form).text == "received"
    assert settled(sessions, form)["status"] == "processed"

    assert state(client, sessions, order_id) == {
        "order": "paid",
        "payment": "succeeded",
        "stock": {"PAGNE": (3, 0)},
        "reservations": ["consumed"],
        "sales": 1,
    }
    assert fake_monetbil.checks(form["transaction_id"]) == 3
    checks = [r for r in fake_monetbil.requests if r.path == CHECK_PATH]
    assert [r.status for r in checks] == [500, 500, 200]
    gaps = [later.time - earlier.time for earlier, later in pairwise(checks)]
    assert gaps[0] >= 0.19 and gaps[1] >= 0.39, gaps  # the declared 0.2 s then 0.4 s


# --- 5. the same callback ten times at once -----------------------------------------


def test_the_same_callback_ten_times_at_once_is_applied_once(client, fake_monetbil, worker, sessions):
    order_id = place(client, ("PAGNE", 2), ("WAX", 3))
    form = fake_monetbil.pay(order_id)
    stored = metric("payfleet_webhooks_total", provider="monetbil", outcome="stored")
    duplicate = metric("payfleet_webhooks_total", provider="monetbil", outcome="duplicate")
    start = threading.Barrier(10)

    def deliver(_: int) -> tuple[int, str]:
        start.wait()
        answer = post_callback(client, form)
        return answer.status_code, answer.text

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(deliver, range(10)))

    assert answers == [(200, "received")] * 10
    assert event_rows(sessions) == 1
    assert metric("payfleet_webhooks_total", provider="monetbil", outcome="stored") == stored + 1
    assert metric("payfleet_webhooks_total", provider="monetbil", outcome="duplicate") == duplicate + 9
    event = settled(sessions, form)
    time.sleep(1.0)  # room for a second application, if there were one
    assert (event["status"], event_of(sessions, form)["attempts"]) == ("processed", 1)
    assert state(client, sessions, order_id) == {
        "order": "paid",
        "payment": "succeeded",
        "stock": {"PAGNE": (3, 0), "WAX": (2, 0)},
        "reservations": ["consumed", "consumed"],
        "sales": 2,
    }
    assert fake_monetbil.checks(form["transaction_id"]) == 1


# --- 6. final and non-final statuses ---------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        ("failed", "failed"),
        ("failure", "failed"),
        ("error", "failed"),
        ("cancelled", "canceled"),
        ("canceled", "canceled"),
    ],
)
def test_a_final_failure_releases_the_reservation(client, fake_monetbil, worker, sessions, status, outcome):
    order_id = place(client, ("PAGNE", 2), ("WAX", 1))
    form = fake_monetbil.pay(order_id, status=status)

    assert post_callback(client, form).text == "received"
    assert settled(sessions, form)["status"] == "processed"

    assert state(client, sessions, order_id) == {
        "order": outcome,
        "payment": outcome,
        "stock": released(["PAGNE", "WAX"]),
        "reservations": ["released", "released"],
        "sales": 0,
    }


@pytest.mark.parametrize("status", ["pending", "processing"])
def test_a_pending_callback_keeps_the_stock_held(client, fake_monetbil, worker, sessions, status):
    order_id = place(client, ("PAGNE", 2))
    form = fake_monetbil.pay(order_id, status=status)

    assert post_callback(client, form).text == "received"
    assert settled(sessions, form)["status"] == "processed"

    assert state(client, sessions, order_id) == {
        "order": "pending_payment",
        "payment": "processing",
        "stock": held({"PAGNE": 2}),
        "reservations": ["active"],
        "sales": 0,
    }
    assert payment_ids(sessions, order_id) == (form["transaction_id"], form["transaction_uuid"])


def test_an_unknown_status_is_ignored_and_changes_nothing(client, fake_monetbil, worker, sessions):
    order_id = place(client, ("PAGNE", 2))
    before = state(client, sessions, order_id)
    form = fake_monetbil.pay(order_id, status="weird")

    assert post_callback(client, form).text == "received"

    assert settled(sessions, form)["status"] == "ignored"
    assert state(client, sessions, order_id) == before
    assert payment_ids(sessions, order_id) == (None, None)
    assert fake_monetbil.checks(form["transaction_id"]) == 0


def test_a_late_pending_never_undoes_a_success(client, fake_monetbil, worker, sessions):
    order_id = place(client, ("PAGNE", 2))
    success = fake_monetbil.pay(order_id)
    pending = resign(success, status="pending", message="pending")

    assert post_callback(client, success).text == "received"
    settled(sessions, success)
    assert post_callback(client, pending).text == "received"
    settled(sessions, pending)

    after = state(client, sessions, order_id)
    assert (after["order"], after["payment"], after["sales"]) == ("paid", "succeeded", 1)


# --- 7. how the payment is found --------------------------------------------------


def _learned(
    client: testing.TestClient, fake: FakeMonetbil, sessions: sessionmaker[Session]
) -> tuple[str, dict[str, str]]:
    """An order whose payment learned its transaction id and uuid from a `pending` callback."""
    order_id = place(client, ("PAGNE", 2))
    pending = fake.pay(order_id, status="pending")
    assert post_callback(client, pending).text == "received"
    settled(sessions, pending)
    assert payment_ids(sessions, order_id) == (pending["transaction_id"], pending["transaction_uuid"])
    return order_id, pending


def test_a_garbage_payment_ref_is_found_by_transaction_id(client, fake_monetbil, worker, sessions):
    order_id, pending = _learned(client, fake_monetbil, sessions)
    fake_monetbil.set_transaction(
        pending["transaction_id"], 1, amount=pending["amount"], currency=pending["currency"]
    )
    success = resign(pending, status="success", payment_ref="garbage-ref", transaction_uuid=str(uuid.uuid4()))

    assert post_callback(client, success).text == "received"

    assert settled(sessions, success)["status"] == "processed"
    after = state(client, sessions, order_id)
    assert (after["order"], after["payment"], after["stock"], after["sales"]) == (
        "paid",
        "succeeded",
        {"PAGNE": (3, 0)},
        1,
    )


def test_a_garbage_payment_ref_and_new_transaction_is_found_by_transaction_uuid(
    client, fake_monetbil, worker, sessions
):
    order_id, pending = _learned(client, fake_monetbil, sessions)
    second = f"{pending['transaction_id']}2"
    fake_monetbil.set_transaction(second, 1, amount=pending["amount"], currency=pending["currency"])
    success = resign(pending, status="success", payment_ref="garbage-ref", transaction_id=second)

    assert post_callback(client, success).text == "received"

    assert settled(sessions, success)["status"] == "processed"
    after = state(client, sessions, order_id)
    assert (after["order"], after["payment"], after["stock"], after["sales"]) == (
        "paid",
        "succeeded",
        {"PAGNE": (3, 0)},
        1,
    )


@pytest.mark.parametrize("status", ["pending", "success", "failed"])
def test_a_callback_for_no_payment_is_retried_then_unmatched(client, fake_monetbil, worker, sessions, status):
    bystander = place(client, ("PAGNE", 2))
    before = state(client, sessions, bystander)
    form = fake_monetbil.pay(str(uuid.uuid4()), status=status, amount="10000")

    assert post_callback(client, form).text == "received"

    event = settled(sessions, form)
    assert (event["status"], event["attempts"]) == ("unmatched", 3)
    assert event["last_error"].startswith("PaymentNotFound")
    assert state(client, sessions, bystander) == before


# --- 8. Monetbil checkout failures ------------------------------------------------


def _checkout_failed_cleanly(
    client: testing.TestClient, sessions: sessionmaker[Session], answer: testing.Result
) -> None:
    assert (answer.status_code, answer.json["error"]) == (502, "provider_error"), answer.text
    rows = _rows(sessions, "SELECT o.status, p.status FROM orders o JOIN payments p ON p.order_id = o.id")
    assert [tuple(r) for r in rows] == [("failed", "failed")]
    assert [r[0] for r in _rows(sessions, "SELECT status FROM stock_reservations")] == ["released"]
    assert (product(client, "PAGNE")["on_hand"], product(client, "PAGNE")["reserved"]) == (5, 0)


def _checkout_works_again(client: testing.TestClient, fake: FakeMonetbil) -> None:
    answer = monetbil_checkout(client, ("PAGNE", 2))
    assert answer.status_code == 201, answer.text
    assert answer.json["payment"]["payment_url"].startswith(fake.base_url)
    assert product(client, "PAGNE")["reserved"] == 2


@pytest.mark.parametrize("fault", ["refused", "http-500"])
def test_a_monetbil_checkout_failure_answers_502_and_leaves_nothing_reserved(
    client, fake_monetbil, sessions, fault
):
    put_product(client, "PAGNE", on_hand=5, currency="XAF", price=PRICE)
    if fault == "refused":
        fake_monetbil.refuse_all("Payment refused by the operator")
    else:
        fake_monetbil.fail_all(500)

    answer = monetbil_checkout(client, ("PAGNE", 2))

    _checkout_failed_cleanly(client, sessions, answer)
    if fault == "refused":
        assert "Payment refused by the operator" in answer.json["detail"]
    fake_monetbil.heal()
    _checkout_works_again(client, fake_monetbil)


def test_a_monetbil_checkout_timeout_answers_502_and_leaves_nothing_reserved(env, fake_monetbil, sessions):
    parts = collaborators(load_settings({**env, "MONETBIL_TIMEOUT_SECONDS": "1"}))
    try:
        client = testing.TestClient(create_app(parts))
        put_product(client, "PAGNE", on_hand=5, currency="XAF", price=PRICE)
        fake_monetbil.delay(2.5)

        started = time.monotonic()
        answer = monetbil_checkout(client, ("PAGNE", 2))

        assert time.monotonic() - started < 2.4
        _checkout_failed_cleanly(client, sessions, answer)
        fake_monetbil.delay(None)
        fake_monetbil.heal()
        _checkout_works_again(client, fake_monetbil)
    finally:
        parts.engine.dispose()


@pytest.mark.parametrize("priced_in", ["XAF", "EUR"])
def test_a_eur_checkout_through_monetbil_is_refused_and_changes_nothing(
    client, fake_monetbil, sessions, priced_in
):
    put_product(client, "PAGNE", on_hand=5, currency=priced_in, price=PRICE)
    body = {
        "items": [{"sku": "PAGNE", "quantity": 2}],
        "provider": "monetbil",
        "currency": "EUR",
        "customer": {"email": "ama@example.cm", "phone": "+237670000000"},
    }

    answer = client.simulate_post("/checkout", json=body)

    assert (answer.status_code, answer.json["error"]) == (400, "invalid_request")
    assert scalar(sessions, "SELECT count(*) FROM orders") == 0
    assert scalar(sessions, "SELECT count(*) FROM stock_reservations") == 0
    assert product(client, "PAGNE")["reserved"] == 0
    assert fake_monetbil.count(WIDGET_PREFIX) == 0


# --- 9. end to end through real processes -----------------------------------------


@pytest.mark.e2e
def test_the_full_monetbil_path_through_real_processes(ingress, spawn, fake_monetbil):
    base = ingress
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    spawn("worker", "--processes", "1", "--threads", "2")
    spawn("scheduler")

    body = {"name": "Pagne wax", "price": PRICE, "currency": "XAF", "on_hand": 4}
    put = requests.put(f"{base}/admin/products/PAGNE", json=body, headers=admin, timeout=10)
    assert put.status_code == 201, put.text
    checkout = {
        "items": [{"sku": "PAGNE", "quantity": 3}],
        "provider": "monetbil",
        "currency": "XAF",
        "customer": {"email": "ama@example.cm", "phone": "+237670000000"},
    }
    placed = requests.post(f"{base}/checkout", json=checkout, timeout=10)
    assert placed.status_code == 201, placed.text
    order_id = placed.json()["order_id"]
    payment_url = placed.json()["payment"]["payment_url"]
    assert requests.get(payment_url, timeout=10).status_code == 200
    assert fake_monetbil.payment_request(order_id)["amount"] == str(3 * PRICE)

    callback = fake_monetbil.pay(order_id)
    answer = requests.post(f"{base}/webhooks/monetbil", data=callback, timeout=10)
    assert (answer.status_code, answer.text) == (200, "received")

    def paid() -> Any:
        seen = requests.get(f"{base}/admin/orders/{order_id}", headers=admin, timeout=10).json()
        return seen["status"] == "paid" and seen

    seen = eventually(paid, timeout=30, interval=0.2)
    assert seen["payment"]["status"] == "succeeded"
    assert seen["payment"]["provider_payment_id"] == callback["transaction_id"]
    assert fake_monetbil.checks(callback["transaction_id"]) == 1
    stock = requests.get(f"{base}/admin/products/PAGNE", headers=admin, timeout=10).json()
    assert (stock["on_hand"], stock["reserved"], stock["available"]) == (1, 0, 1)
    movements = requests.get(f"{base}/admin/products/PAGNE/movements", headers=admin, timeout=10).json()
    assert [(m["type"], m["quantity"], m["reference"]) for m in movements["movements"]] == [
        ("sale", -3, order_id),
        ("restock", 4, None),
    ]
