"""Every route of the README's HTTP table, through the real app and
PostgreSQL (falcon's TestClient, for speed): mutated bodies, odd path
parameters and query strings, with and without the admin token; then odd
paths and methods. The guard (conftest) checks each answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from falcon import testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import ADMIN_TOKEN
from tests.fuzz.conftest import Guard, Shop
from tests.fuzz.nasty import FUZZ, ODD_TEXT, RAW_BODIES, examples, mutated

TOKENS = st.sampled_from(
    [
        None,
        f"Bearer {ADMIN_TOKEN}",
        f"Bearer {ADMIN_TOKEN}",
        "Bearer wrong",
        "Bearer ",
        f"bearer {ADMIN_TOKEN}",
        f"Bearer {ADMIN_TOKEN} ",
        f"Basic {ADMIN_TOKEN}",
        ADMIN_TOKEN,
    ]
)
ODD_PIECES = st.sampled_from(
    [
        "",
        "%00",
        "%ED%A0%80",
        "%FF",
        "..",
        "%2e%2e",
        "a%2Fb",
        "x" * 300,
        " ",
        "-1",
        "0",
        "99999999999999999999",
        "00000000-0000-0000-0000-000000000000",
        "TEE%00",
        "%C3%A9",
        "'; DROP TABLE orders; --",
    ]
)

CHECKOUT = {
    "items": [{"sku": "TEE", "quantity": 1}, {"sku": "CAP", "quantity": 2}],
    "provider": "stripe",
    "currency": "EUR",
    "customer": {"email": "ada@example.com", "phone": "+33600000000"},
}
MONETBIL_CHECKOUT = {
    "items": [{"sku": "XAF-1", "quantity": 1}],
    "provider": "monetbil",
    "currency": "XAF",
    "customer": {"email": "ama@example.cm", "phone": "+237670000000"},
}
PRODUCT = {"name": "Tee", "price": 1500, "currency": "EUR", "on_hand": 1000, "low_stock_threshold": 2}


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # {cart}, {order}, {event}, {sku}, {job} are filled in
    body: Any = None  # a template to mutate, or None for a route that reads no body
    query: tuple[tuple[str, tuple[str, ...]], ...] = ()  # parameter, plausible values


ROUTING = {
    "rules": [
        {"name": "cm", "match": {"currency": ["XAF"], "country": ["CM"]}, "providers": ["monetbil"]},
        {"name": "big", "match": {"min_amount": 100000}, "providers": ["stripe"]},
    ]
}

ROUTES = [
    Route("POST", "/checkout", CHECKOUT),
    Route("POST", "/checkout", MONETBIL_CHECKOUT),
    Route("POST", "/checkout", {"cart_id": "{cart}", "provider": "stripe", "currency": "EUR"}),
    Route("POST", "/carts"),
    Route("GET", "/carts/{cart}"),
    Route("PUT", "/carts/{cart}/items", {"sku": "TEE", "quantity": 2}),
    Route("PUT", "/admin/products/{sku}", PRODUCT),
    Route("GET", "/admin/products/{sku}"),
    Route("GET", "/admin/products", query=(("low_stock", ("true", "false")), ("limit", ("1", "500")))),
    Route("GET", "/admin/products/{sku}/movements", query=(("limit", ("5",)), ("before", ("1", "100")))),
    Route("GET", "/admin/reservations/stats"),
    Route("GET", "/admin/orders", query=(("status", ("needs_attention", "paid")), ("limit", ("10",)))),
    Route("POST", "/admin/orders/{order}/ready-for-pickup"),
    Route("POST", "/admin/orders/{order}/complete"),
    Route("POST", "/admin/orders/{order}/return", {"lines": [{"sku": "TEE", "quantity": 1}]}),
    Route("GET", "/admin/orders/{order}"),
    Route(
        "GET", "/admin/events", query=(("provider", ("stripe",)), ("status", ("failed",)), ("limit", ("2",)))
    ),
    Route("POST", "/admin/events/{event}/replay"),
    Route("GET", "/admin/jobs"),
    Route("GET", "/admin/jobs/runs", query=(("job", ("clean-expired-carts",)), ("limit", ("3",)))),
    Route("GET", "/admin/jobs/metrics"),
    Route("POST", "/admin/jobs/{job}/run"),
    Route("GET", "/admin/routing"),
    Route("PUT", "/admin/routing", ROUTING),
    Route("GET", "/admin/routing/history"),
    Route("GET", "/admin/routing/providers"),
    Route("GET", "/admin/events/{event}"),
    Route("POST", "/admin/routing/explain", {"currency": "XAF", "country": "CM", "amount": 2500}),
    Route("POST", "/admin/events/replay", {"status": "failed", "provider": "stripe", "dry_run": True}),
    Route("GET", "/openapi.json"),
    Route("GET", "/healthz"),
    Route("GET", "/readyz"),
    Route("GET", "/metrics"),
]


def _fill(draw: st.DrawFn, route: Route, shop: Shop) -> str:
    real = {
        "cart": shop.cart_id,
        "order": shop.order_id,
        "event": str(shop.event_id),
        "sku": "TEE",
        "job": "clean-expired-carts",
    }
    path = route.path
    for name, value in real.items():
        if "{" + name + "}" in path:
            path = path.replace("{" + name + "}", draw(st.just(value) | ODD_PIECES))
    return path


def _encode(value: str) -> str:
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


def _query(draw: st.DrawFn, route: Route) -> str:
    pairs = []
    for name, plausible in route.query:
        if draw(st.booleans()):
            value = draw(st.sampled_from(plausible) | ODD_TEXT)
            pairs.append(f"{name}={_encode(value)}")
    return "&".join(pairs)


def _body(draw: st.DrawFn, route: Route, shop: Shop) -> bytes | None:
    if route.body is None:
        return draw(st.none() | RAW_BODIES)
    template = route.body
    if template.get("cart_id") == "{cart}":
        template = {**template, "cart_id": shop.cart_id}
    return draw(mutated(template))


def _headers(token: str | None, draw: st.DrawFn) -> dict[str, str]:
    headers = {
        "Content-Type": draw(
            st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"])
        )
    }
    if token is not None:
        headers["Authorization"] = token
    return headers


def _admitted(token: str | None) -> bool:
    # HTTP drops the whitespace around a header's value: a trailing space is the token still.
    return token is not None and token.strip() == f"Bearer {ADMIN_TOKEN}"


@settings(FUZZ, max_examples=examples(150))
@given(data=st.data())
def test_every_route_with_mutated_input(
    client: testing.TestClient, shop: Shop, guard: Guard, data: Any
) -> None:
    route = data.draw(st.sampled_from(ROUTES), label="route")
    path = _fill(data.draw, route, shop)
    query = _query(data.draw, route)
    body = _body(data.draw, route, shop)
    token = data.draw(TOKENS, label="token")
    before = guard.before()
    answer = client.simulate_request(
        route.method, path, query_string=query or None, body=body, headers=_headers(token, data.draw)
    )
    guard.check(route.method, path, answer.status_code, _admitted(token), before, answer.text)


ODD_METHODS = st.sampled_from(
    ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "PROPFIND"]
)
PATH_TWISTS = st.sampled_from(
    [
        lambda p: p,
        lambda p: "/" + p,
        lambda p: p + "/",
        lambda p: p.upper(),
        lambda p: p.replace("/", "//"),
        lambda p: p.replace("/admin", "/admin/.."),
        lambda p: p.replace("/admin/", "/admin/%2e%2e/admin/"),
        lambda p: p.replace("/", "%2F"),
        lambda p: p + "/" + "x" * 500,
        lambda p: p + "%00",
        lambda p: p + ";x=1",
    ]
)


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")
@settings(FUZZ, max_examples=examples(100))
@given(data=st.data())
def test_odd_paths_and_methods(client: testing.TestClient, shop: Shop, guard: Guard, data: Any) -> None:
    route = data.draw(st.sampled_from(ROUTES), label="route")
    path = data.draw(PATH_TWISTS)(_fill(data.draw, route, shop))
    if not path.startswith("/"):
        path = "/" + path
    method = data.draw(ODD_METHODS, label="method")
    token = data.draw(TOKENS, label="token")
    body = data.draw(st.none() | RAW_BODIES)
    before = guard.before()
    answer = client.simulate_request(method, path, body=body, headers=_headers(token, data.draw))
    guard.check(method, path, answer.status_code, _admitted(token), before, answer.text)
