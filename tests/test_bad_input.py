"""Bad input is a clear 400 and changes nothing (DESIGN promise 8; issue 9,
items 1 and 10): one test per case that was a 500, or that was not bounded,
so each fix has the test that fails without it.

The in-process cases go through falcon's TestClient on the real app and
PostgreSQL; the framing cases need the real gunicorn ingress, whose input
stream is what refuses a broken chunked body."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from falcon import testing
from sqlalchemy import text

from ingress.app import collaborators, create_app
from payfleet.platform.config import load_settings
from tests.conftest import scalar
from tests.support.monetbil_signing import signed_callback
from tests.support.shop import ADMIN, call, put_product
from tests.support.stripe_signing import sign_stripe_payload, stripe_event

SECRET = "whsec_test_current"
HUGE = "1" * 5000  # over Python's 4300-digit limit for int(): json.loads raises ValueError
DEEP = 5000  # nesting json.loads cannot follow (RecursionError)
LONE = "\\ud800"  # a lone surrogate, as a JSON escape: decodable, not encodable as UTF-8


# --- helpers


def snapshot(sessions: Any) -> dict[str, list[tuple[Any, ...]]]:
    """What bad input must never change: stock, orders, payments, events, carts."""
    queries = {
        "products": "SELECT sku, name, price, on_hand, reserved FROM products ORDER BY sku",
        "movements": "SELECT id FROM stock_movements ORDER BY id",
        "reservations": "SELECT id, status FROM stock_reservations ORDER BY id",
        "orders": "SELECT id, status FROM orders ORDER BY id",
        "payments": "SELECT id, status FROM payments ORDER BY id",
        "events": "SELECT id, status FROM provider_events ORDER BY id",
        "carts": "SELECT cart_id, sku, quantity FROM cart_items ORDER BY cart_id, sku",
    }
    with sessions() as session:
        return {name: [tuple(row) for row in session.execute(text(sql))] for name, sql in queries.items()}


def assert_400(result: testing.Result, *words: str) -> None:
    assert result.status_code == 400, f"{result.status_code}: {result.text}"
    assert set(result.json) >= {"error", "detail"}, result.json
    for word in words:
        assert word in result.json["detail"], result.json


def checkout_text(items: str = '[{"sku": "TEE", "quantity": 1}]', email: str = "ada@example.com") -> str:
    return (
        f'{{"items": {items}, "provider": "stripe", "currency": "EUR",'
        f' "customer": {{"email": "{email}", "phone": "+33600000000"}}}}'
    )


def deep_list(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def deep_object(depth: int = DEEP) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def post_json(client: testing.TestClient, path: str, body: str, **kwargs: Any) -> testing.Result:
    return call(client, "POST", path, body=body.encode(), **kwargs)


def signed_event(event: dict[str, Any] | str) -> tuple[bytes, dict[str, str]]:
    body = (json.dumps(event) if isinstance(event, dict) else event).encode()
    return body, {"Stripe-Signature": sign_stripe_payload(body, SECRET), "Content-Type": "application/json"}


def stripe_text(
    event_id: str = '"evt_1"', event_type: str = '"payment_intent.succeeded"', obj: str = "{}"
) -> str:
    return f'{{"id": {event_id}, "object": "event", "type": {event_type}, "data": {{"object": {obj}}}}}'


def deliver_text(client: testing.TestClient, event: str) -> testing.Result:
    body, headers = signed_event(event)
    return call(client, "POST", "/webhooks/stripe", body=body, headers=headers)


@pytest.fixture
def shelf(client: testing.TestClient) -> testing.TestClient:
    put_product(client, "TEE", on_hand=500)
    put_product(client, "CAP", on_hand=500)
    return client


def new_cart(client: testing.TestClient) -> str:
    answer = call(client, "POST", "/carts")
    assert answer.status_code == 201, answer.text
    return str(answer.json["id"])


# --- item 1: huge integers, deep nesting


def test_a_huge_integer_at_checkout_is_400(shelf, sessions):
    before = snapshot(sessions)
    answer = post_json(shelf, "/checkout", checkout_text(f'[{{"sku": "TEE", "quantity": {HUGE}}}]'))
    assert_400(answer, "integer")
    assert snapshot(sessions) == before


def test_deep_nesting_at_checkout_is_400(shelf, sessions):
    before = snapshot(sessions)
    for deep in (deep_list(), deep_object()):
        assert_400(post_json(shelf, "/checkout", checkout_text(deep)), "nested")
    assert snapshot(sessions) == before


def test_a_huge_integer_or_deep_nesting_in_a_cart_line_is_400(shelf, sessions):
    cart_id = new_cart(shelf)
    before = snapshot(sessions)
    path = f"/carts/{cart_id}/items"
    assert_400(call(shelf, "PUT", path, body=f'{{"sku": "TEE", "quantity": {HUGE}}}'.encode()), "integer")
    assert_400(call(shelf, "PUT", path, body=f'{{"sku": {deep_list()}, "quantity": 1}}'.encode()), "nested")
    assert snapshot(sessions) == before


def test_a_huge_integer_or_deep_nesting_in_admin_bodies_is_400(shelf, sessions):
    before = snapshot(sessions)
    product = '{"name": "T", "price": %s, "currency": "EUR", "on_hand": 1}'
    for body in (product % HUGE, product % deep_list()):
        assert_400(call(shelf, "PUT", "/admin/products/TEE", body=body.encode(), headers=ADMIN))
    order = "/admin/orders/00000000-0000-0000-0000-000000000000/return"
    for body in (f'{{"lines": [{{"sku": "TEE", "quantity": {HUGE}}}]}}', f'{{"lines": {deep_object()}}}'):
        assert_400(call(shelf, "POST", order, body=body.encode(), headers=ADMIN))
    assert snapshot(sessions) == before


def test_a_signed_stripe_event_with_a_huge_integer_or_deep_nesting_is_400(client, sessions):
    before = snapshot(sessions)
    assert_400(deliver_text(client, stripe_text(obj=f'{{"amount": {HUGE}}}')), "integer")
    assert_400(deliver_text(client, stripe_text(obj=f'{{"metadata": {deep_list()}}}')), "nested")
    assert snapshot(sessions) == before


def test_nesting_deeper_than_any_real_body_is_400(client, sessions):
    # 900 levels still parse, but nothing real nests so deep, and every later
    # reader (jsonb, the worker's json, the admin views) would recurse through
    # them again from deeper in its stack: refused at the door instead.
    before = snapshot(sessions)
    assert_400(deliver_text(client, stripe_text(obj=f'{{"metadata": {deep_list(900)}}}')), "nested")
    assert snapshot(sessions) == before


def test_a_returned_quantity_beyond_an_integer_column_is_400(shelf, sessions, fake_stripe):
    placed = post_json(shelf, "/checkout", checkout_text())
    assert placed.status_code == 201, placed.text
    before = snapshot(sessions)
    path = f"/admin/orders/{placed.json['order_id']}/return"
    body = json.dumps({"lines": [{"sku": "TEE", "quantity": 2**40}]}).encode()
    assert_400(call(shelf, "POST", path, body=body, headers=ADMIN), "2147483647")
    assert snapshot(sessions) == before


def test_a_currency_of_non_ascii_letters_is_400_as_a_currency(shelf, sessions):
    # "ß".upper() is "SS": three letters became four, too long for the column.
    before = snapshot(sessions)
    product = {"name": "T", "price": 1, "currency": "ßab", "on_hand": 1}
    answer = call(shelf, "PUT", "/admin/products/TEE", json=product, headers=ADMIN)
    assert_400(answer, "ISO")
    assert snapshot(sessions) == before


# --- item 1: unencodable strings


def test_lone_surrogates_at_checkout_are_400(shelf, sessions):
    before = snapshot(sessions)
    assert_400(post_json(shelf, "/checkout", checkout_text(f'[{{"sku": "T{LONE}", "quantity": 1}}]')))
    assert_400(post_json(shelf, "/checkout", checkout_text(email=f"ada{LONE}@example.com")))
    phone = checkout_text().replace("+33600000000", f"+336{LONE}")
    assert_400(post_json(shelf, "/checkout", phone))
    assert snapshot(sessions) == before


def test_lone_surrogates_in_carts_and_products_are_400(shelf, sessions):
    cart_id = new_cart(shelf)
    before = snapshot(sessions)
    line = f'{{"sku": "T{LONE}", "quantity": 1}}'.encode()
    assert_400(call(shelf, "PUT", f"/carts/{cart_id}/items", body=line))
    named = f'{{"name": "T{LONE}", "price": 1, "currency": "EUR", "on_hand": 1}}'.encode()
    assert_400(call(shelf, "PUT", "/admin/products/TEE", body=named, headers=ADMIN))
    assert snapshot(sessions) == before


def test_a_nul_in_a_sku_path_is_400_without_postgresql_words(shelf, sessions):
    # Falcon decodes a path's bad UTF-8 to U+FFFD, but %00 arrives as NUL,
    # which PostgreSQL's text refuses.
    before = snapshot(sessions)
    plain = b'{"name": "T", "price": 1, "currency": "EUR", "on_hand": 1}'
    assert_400(call(shelf, "PUT", "/admin/products/T%00", body=plain, headers=ADMIN), "NUL")
    assert_400(call(shelf, "GET", "/admin/products/T%00", headers=ADMIN), "NUL")
    assert_400(call(shelf, "GET", "/admin/products/T%00/movements", headers=ADMIN), "NUL")
    assert snapshot(sessions) == before


def test_a_stripe_event_with_lone_surrogates_or_nul_is_400(client, sessions):
    before = snapshot(sessions)
    assert_400(deliver_text(client, stripe_text(event_id=f'"evt_{LONE}"')))
    assert_400(deliver_text(client, stripe_text(event_type=f'"payment_intent.{LONE}"')))
    # PostgreSQL's jsonb refuses both escapes anywhere in a stored payload.
    assert_400(deliver_text(client, stripe_text(obj=f'{{"description": "a{LONE}"}}')))
    assert_400(deliver_text(client, stripe_text(obj='{"description": "a\\u0000"}')))
    assert_400(deliver_text(client, stripe_text(obj='{"a\\u0000": 1}')))
    assert snapshot(sessions) == before


def test_a_body_shorter_than_its_content_length_is_400(shelf, sessions, fake_stripe):
    """A lying Content-Length: the client stopped early, so what arrived is
    a prefix of what it meant, even when the prefix parses."""
    before = snapshot(sessions)
    body = checkout_text().encode()
    answer = call(shelf, "POST", "/checkout", body=body, extras={"CONTENT_LENGTH": str(len(body) + 40)})
    assert_400(answer, "ended")
    assert snapshot(sessions) == before


# --- item 1: Stripe-Signature


def test_a_stripe_timestamp_item_is_read_the_way_the_library_reads_it(client, sessions):
    """`t=<now>=1` is signed at <now> for the library (it splits on '=' at most
    twice and takes the second part); payfleet reads the same timestamp."""
    now = int(time.time())
    body = stripe_event("payment_intent.succeeded", {"id": "pi_1", "object": "payment_intent"}, "evt_eq")
    v1 = sign_stripe_payload(body, SECRET, timestamp=now).split(",")[1]
    headers = {"Stripe-Signature": f"t={now}=1,{v1}", "Content-Type": "application/json"}
    answer = call(client, "POST", "/webhooks/stripe", body=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert scalar(sessions, "SELECT count(*) FROM provider_events WHERE event_key = 'evt_eq'") == 1
    # An old signature stays old, whatever follows its timestamp.
    old = now - 3600
    body = stripe_event("payment_intent.succeeded", {"id": "pi_2", "object": "payment_intent"}, "evt_old")
    v1 = sign_stripe_payload(body, SECRET, timestamp=old).split(",")[1]
    headers = {"Stripe-Signature": f"t={old}={now},{v1}", "Content-Type": "application/json"}
    answer = call(client, "POST", "/webhooks/stripe", body=body, headers=headers)
    assert_400(answer, "old")
    assert scalar(sessions, "SELECT count(*) FROM provider_events WHERE event_key = 'evt_old'") == 0


# --- item 1: no PostgreSQL text in answers


def test_a_value_postgresql_refuses_is_400_without_its_message(client, sessions):
    """A signed event whose id is longer than the column: PostgreSQL refuses
    it; the caller learns that a value is too long, not PostgreSQL's words."""
    before = snapshot(sessions)
    answer = deliver_text(client, stripe_text(event_id=json.dumps("evt_" + "x" * 300)))
    assert_400(answer)
    detail = answer.json["detail"].lower()
    for leak in ("character varying", "varchar", "psycopg", "sql", "insert", "(255)"):
        assert leak not in detail, answer.json
    assert snapshot(sessions) == before


# --- item 10: order bounds


@pytest.fixture
def bounded(env: dict[str, str]) -> Iterator[testing.TestClient]:
    """The app with small order bounds: 5 units, 2 lines."""
    parts = collaborators(load_settings({**env, "MAX_ORDER_UNITS": "5", "MAX_ORDER_LINES": "2"}))
    yield testing.TestClient(create_app(parts))
    parts.engine.dispose()


def items(*lines: tuple[str, int]) -> str:
    return json.dumps([{"sku": sku, "quantity": quantity} for sku, quantity in lines])


def test_a_checkout_over_the_unit_bound_is_400_with_the_limit(shelf, bounded, sessions, fake_stripe):
    before = snapshot(sessions)
    assert_400(post_json(bounded, "/checkout", checkout_text(items(("TEE", 6)))), "5")
    assert_400(post_json(bounded, "/checkout", checkout_text(items(("TEE", 3), ("CAP", 3)))), "5")
    assert snapshot(sessions) == before
    assert post_json(bounded, "/checkout", checkout_text(items(("TEE", 3), ("CAP", 2)))).status_code == 201


def test_a_checkout_over_the_line_bound_is_400_with_the_limit(shelf, bounded, sessions, fake_stripe):
    put_product(shelf, "MUG", on_hand=10)
    before = snapshot(sessions)
    answer = post_json(bounded, "/checkout", checkout_text(items(("TEE", 1), ("CAP", 1), ("MUG", 1))))
    assert_400(answer, "2")
    assert snapshot(sessions) == before


def test_the_default_bounds_are_100_units_and_50_lines(shelf, sessions):
    before = snapshot(sessions)
    assert_400(post_json(shelf, "/checkout", checkout_text(items(("TEE", 101)))), "100")
    many = [{"sku": f"S{i}", "quantity": 1} for i in range(51)]
    assert_400(post_json(shelf, "/checkout", checkout_text(json.dumps(many))), "50")
    assert snapshot(sessions) == before


def test_a_cart_cannot_grow_past_the_bounds(shelf, bounded, sessions):
    put_product(shelf, "MUG", on_hand=10)
    cart_id = new_cart(bounded)
    path = f"/carts/{cart_id}/items"
    assert call(bounded, "PUT", path, json={"sku": "TEE", "quantity": 3}).status_code == 200
    assert call(bounded, "PUT", path, json={"sku": "CAP", "quantity": 2}).status_code == 200
    before = snapshot(sessions)
    assert_400(call(bounded, "PUT", path, json={"sku": "CAP", "quantity": 3}), "5")
    assert_400(call(bounded, "PUT", path, json={"sku": "MUG", "quantity": 0 + 1}), "2")
    assert snapshot(sessions) == before
    # Lowering a line is always allowed, and so is replacing one within the bound.
    assert call(bounded, "PUT", path, json={"sku": "TEE", "quantity": 1}).status_code == 200


def test_checking_out_a_cart_over_the_bounds_is_400(shelf, bounded, sessions, fake_stripe):
    # Filled under the default bounds, checked out under smaller ones.
    cart_id = new_cart(shelf)
    path = f"/carts/{cart_id}/items"
    assert call(shelf, "PUT", path, json={"sku": "TEE", "quantity": 9}).status_code == 200
    before = snapshot(sessions)
    body = json.dumps({"cart_id": cart_id, "provider": "stripe", "currency": "EUR"})
    assert_400(post_json(bounded, "/checkout", body), "5")
    assert snapshot(sessions) == before


# --- item 1: broken framing (real gunicorn)


BODY_ROUTES: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("POST", "/webhooks/stripe", {}),
    ("POST", "/webhooks/monetbil", {"Content-Type": "application/x-www-form-urlencoded"}),
    ("POST", "/checkout", {}),
    ("PUT", "/carts/00000000-0000-0000-0000-000000000000/items", {}),
    ("PUT", "/admin/products/TEE", ADMIN),
    ("POST", "/admin/orders/00000000-0000-0000-0000-000000000000/return", ADMIN),
)


def raw_exchange(base: str, head: bytes, body: bytes, *, half_close: bool = False) -> bytes:
    """Send a request's head and (framed) body as bytes; return the whole answer."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(head + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
                if b"\r\n\r\n" in answer and _complete(answer):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    return answer


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def chunked_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        f"Stripe-Signature: t=1,v1=00\r\nConnection: close\r\n{extra}\r\n"
    ).encode()


def status_of(answer: bytes) -> int:
    assert answer, "no answer at all"
    return int(answer.split(b" ", 2)[1])


def assert_framing_refused(ingress: str, sessions: Any, body: bytes, *, half_close: bool = False) -> None:
    before = snapshot(sessions)
    for method, path, headers in BODY_ROUTES:
        answer = raw_exchange(ingress, chunked_head(method, path, headers), body, half_close=half_close)
        assert status_of(answer) == 400, f"{method} {path}: {answer[:300]!r}"
        assert b"signature" not in answer.partition(b"\r\n\r\n")[2], answer  # refused before any check
    assert snapshot(sessions) == before


def test_a_bad_chunk_size_is_400_on_every_body_route(ingress, sessions):
    assert_framing_refused(ingress, sessions, b"zz\r\n{}\r\n0\r\n\r\n")


def test_a_missing_chunk_terminator_is_400_on_every_body_route(ingress, sessions):
    assert_framing_refused(ingress, sessions, b"2\r\n{}XX0\r\n\r\n")


def test_a_truncated_chunked_body_is_400_on_every_body_route(ingress, sessions):
    assert_framing_refused(ingress, sessions, b"40\r\n{}", half_close=True)


# Monetbil's form route reads its body the same way; a signed callback stays 200 over the same server.
def test_framing_checks_leave_a_good_chunked_callback_alone(ingress, sessions):
    form = signed_callback("svc_test_secret", transaction_id="TX1", status="pending", payment_ref="x")
    body = "&".join(f"{k}={v}" for k, v in form.items()).encode()
    head = chunked_head("POST", "/webhooks/monetbil", {"Content-Type": "application/x-www-form-urlencoded"})
    answer = raw_exchange(ingress, head, f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    assert status_of(answer) == 200, answer
