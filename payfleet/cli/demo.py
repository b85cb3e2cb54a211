"""`payfleet demo [--url URL]`: a scripted tour of payfleet's main job
against a running fleet whose providers are the sandbox (`make up` with no
provider keys). Each step says what it expects, checks it over the public
HTTP API and prints what it saw; the tour stops at the first step that does
not hold, and exits 0 only if every one held."""

from __future__ import annotations

import argparse
import itertools
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from payfleet.platform.config import Settings

# The longest payment window the tour waits out to show an expiry.
LONGEST_WAIT_SECONDS = 60
SETTLE_SECONDS = 30.0


class StepFailed(Exception):
    """What a step expected and what it saw instead."""


class Explained(Exception):
    """A step this fleet cannot show, and why (it counts as held)."""


@dataclass
class Tour:
    url: str
    sandbox: str
    admin: dict[str, str]
    run: str = field(default_factory=lambda: secrets.token_hex(3).upper())
    orders: dict[str, str] = field(default_factory=dict)  # what each order shows -> its id
    http: requests.Session = field(default_factory=requests.Session)

    @property
    def tee(self) -> str:
        return f"DEMO-TEE-{self.run}"

    @property
    def wax(self) -> str:
        return f"DEMO-WAX-{self.run}"

    def call(self, method: str, path: str, expect: int, *, base: str | None = None, **kw: Any) -> Any:
        url = f"{base or self.url}{path}"
        try:
            answer = self.http.request(method, url, timeout=SETTLE_SECONDS, headers=self.admin, **kw)
        except requests.RequestException as error:
            raise StepFailed(f"{method} {url}: no answer ({type(error).__name__})") from None
        if answer.status_code != expect:
            raise StepFailed(
                f"{method} {url}: expected HTTP {expect}, got {answer.status_code} {answer.text[:300]}"
            )
        return answer.json() if answer.content else None

    def order(self, name: str) -> Any:
        return self.call("GET", f"/admin/orders/{self.orders[name]}", 200)

    def product(self, sku: str) -> Any:
        return self.call("GET", f"/admin/products/{sku}", 200)

    def act(self, name: str, action: str, **body: Any) -> Any:
        path = f"/sandbox/orders/{quote(self.orders[name], safe='')}/{action}"
        done = self.call("POST", path, 200, base=self.sandbox, json=body)
        refused = [d for d in done["deliveries"] if not d["delivered"]]
        if refused:
            raise StepFailed(
                f"the ingress refused {done['event']}: HTTP {refused[0]['status']} ({refused[0]['error']})"
            )
        return done

    def wait_for(self, name: str, status: str) -> Any:
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            order = self.order(name)
            if order["status"] == status:
                return order
            if time.monotonic() > deadline:
                raise StepFailed(
                    f"order {order['id']} is {order['status']}, expected {status} (is a worker running?)"
                )
            time.sleep(0.2)

    def checkout(self, name: str, sku: str, quantity: int, provider: str, currency: str) -> Any:
        body = {
            "items": [{"sku": sku, "quantity": quantity}],
            "provider": provider,
            "currency": currency,
            "customer": {"email": "ada@example.com", "phone": "+237670000000"},
        }
        try:
            placed = self.call("POST", "/checkout", 201, json=body)
        except StepFailed as failure:
            raise StepFailed(f"{failure}; is the fleet in sandbox mode (no provider keys)?") from None
        self.orders[name] = placed["order_id"]
        self.call("GET", f"/sandbox/orders/{quote(placed['order_id'], safe='')}", 200, base=self.sandbox)
        return placed

    def expect(self, what: str, seen: Any, wanted: Any) -> None:
        if seen != wanted:
            raise StepFailed(f"{what}: expected {wanted!r}, saw {seen!r}")


Step = Callable[[Tour], str]


def fleet_up(t: Tour) -> str:
    t.call("GET", "/readyz", 200)
    about = t.call("GET", "/sandbox", 200, base=t.sandbox)
    return f"ingress ready at {t.url}; sandbox at {t.sandbox} sends webhooks to {about['webhook_url']}"


def create_products(t: Tour) -> str:
    t.call("PUT", f"/admin/products/{t.tee}", 201, json=_product("Demo T-shirt", 2500, "EUR"))
    t.call("PUT", f"/admin/products/{t.wax}", 201, json=_product("Demo wax print", 5000, "XAF"))
    stock = t.product(t.tee)
    t.expect(f"{t.tee} stock", (stock["on_hand"], stock["reserved"]), (10, 0))
    return f"{t.tee} (EUR 25.00) and {t.wax} (XAF 5000), 10 of each"


def _product(name: str, price: int, currency: str) -> dict[str, Any]:
    return {"name": name, "price": price, "currency": currency, "on_hand": 10, "low_stock_threshold": 2}


def checkout_stripe(t: Tour) -> str:
    placed = t.checkout("stripe", t.tee, 2, "stripe", "EUR")
    t.expect("status", placed["status"], "pending_payment")
    t.expect(f"{t.tee} reserved", t.product(t.tee)["reserved"], 2)
    intent = placed["payment"]["provider_payment_id"]
    return f"order {placed['order_id']}: pending_payment, PaymentIntent {intent}, 2 units reserved"


def checkout_monetbil(t: Tour) -> str:
    placed = t.checkout("monetbil", t.wax, 1, "monetbil", "XAF")
    t.expect("status", placed["status"], "pending_payment")
    return f"order {placed['order_id']}: pending_payment, pay at {placed['payment']['payment_url']}"


def pay_stripe(t: Tour) -> str:
    done = t.act("stripe", "pay")
    t.wait_for("stripe", "paid")
    stock = t.product(t.tee)
    t.expect(f"{t.tee} on_hand, reserved", (stock["on_hand"], stock["reserved"]), (8, 0))
    return f"{done['event']} delivered, signed; order paid; {t.tee}: 2 sold, on_hand 8"


def pay_monetbil(t: Tour) -> str:
    t.act("monetbil", "pay")
    order = t.wait_for("monetbil", "paid")
    t.expect("payment", order["payment"]["status"], "succeeded")
    return f"callback 'success' delivered, confirmed with check-payment; order paid; {t.wax}: on_hand 9"


def fail_one(t: Tour) -> str:
    t.checkout("declined", t.wax, 1, "monetbil", "XAF")
    t.act("declined", "fail")
    t.wait_for("declined", "failed")
    t.expect(f"{t.wax} reserved", t.product(t.wax)["reserved"], 0)
    return "mobile money refused: order failed, its unit back on sale"


def expire_one(t: Tour) -> str:
    placed = t.checkout("expired", t.tee, 1, "stripe", "EUR")
    order = t.order("expired")
    window = (_when(order["expires_at"]) - _when(order["created_at"])).total_seconds()
    if window > LONGEST_WAIT_SECONDS:
        t.call("POST", f"/sandbox/orders/{placed['order_id']}/cancel", 200, base=t.sandbox)
        t.wait_for("expired", "canceled")
        raise Explained(
            f"this fleet's payment window is {window:.0f} s; restart it with ORDER_PAYMENT_WINDOW_SECONDS=15 "
            "to watch an order expire (this order was cancelled by the customer instead)"
        )
    time.sleep(max(0.0, window) + 1)
    queued = t.call("POST", "/admin/jobs/expire-stale-orders/run", 202)
    t.wait_for("expired", "expired")
    intent = t.call("GET", f"/sandbox/orders/{placed['order_id']}", 200, base=t.sandbox)["payment_intent"]
    t.expect("PaymentIntent status", intent["status"], "canceled")
    t.expect(f"{t.tee} reserved", t.product(t.tee)["reserved"], 0)
    return (
        f"window of {window:.0f} s passed; expire-stale-orders run {queued['run_id']}: order expired, "
        "PaymentIntent cancelled, unit released"
    )


def duplicate_storm(t: Tour) -> str:
    t.checkout("storm", t.tee, 1, "stripe", "EUR")
    t.act("storm", "pay", duplicate=9)
    t.act("storm", "trigger", event="payment_intent.payment_failed", duplicate=2)
    t.act("storm", "trigger", event="payment_intent.processing", duplicate=2)
    order = t.wait_for("storm", "paid")
    time.sleep(1)  # the late events are applied (and refused) by now; the order must not move
    order = t.wait_for("storm", "paid")
    sales = [e for e in order["timeline"] if e["kind"] == "movement" and e["type"] == "sale"]
    stored = [e for e in order["timeline"] if e["kind"] == "event"]
    t.expect("sale movements", len(sales), 1)
    t.expect("stored events", len(stored), 3)
    t.expect("payment", order["payment"]["status"], "succeeded")
    return (
        "10 copies of the success, then 3 late failures and 3 late 'processing': paid once, 1 sale, 3 events"
    )


def timelines(t: Tour) -> str:
    for name, order_id in t.orders.items():
        order = t.order(name)
        print(f"      {name}: order {order_id} is {order['status']}")
        for entry in order["timeline"]:
            print(f"        {_entry(entry)}")
    return f"{len(t.orders)} orders"


def _entry(entry: dict[str, Any]) -> str:
    at = entry["at"][11:19]
    if entry["kind"] == "event":
        return f"{at} event      {entry['type']} ({entry['status']})"
    if entry["kind"] == "transition":
        return (
            f"{at} transition {entry['subject']} {entry['from'] or 'new'} -> {entry['to']}: {entry['reason']}"
        )
    return f"{at} movement   {entry['type']} {entry['quantity']} ({entry['before']} -> {entry['after']})"


def stock_ledger(t: Tour) -> str:
    for sku in (t.tee, t.wax):
        ledger = list(reversed(t.call("GET", f"/admin/products/{sku}/movements", 200)["movements"]))
        print(f"      {sku}:")
        for before, after in itertools.pairwise(ledger):
            t.expect(f"{sku} ledger chain", after["before"], before["after"])
        for m in ledger:
            reference = m["reference"] or ""
            print(
                f"        {m['type']:<10} {m['quantity']:>4}  {m['before']:>3} -> {m['after']:<3} {reference}"
            )
        t.expect(f"{sku} on_hand", t.product(sku)["on_hand"], ledger[-1]["after"])
    return "every movement starts where the one before ended, and ends at today's on_hand"


def links(t: Tour) -> str:
    order = t.orders.get("stripe", "")
    print("      RabbitMQ management UI: http://127.0.0.1:15672 (guest/guest)")
    print(f"      metrics:                {t.url}/metrics")
    print(f"      an order:               {t.url}/admin/orders/{order} (Authorization: Bearer $ADMIN_TOKEN)")
    print(f"      webhook deliveries:     {t.sandbox}/sandbox/deliveries")
    print("      try it yourself:        payfleet sandbox pay|fail|cancel|refund ORDER_ID")
    return "done"


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text)


STEPS: list[tuple[str, Step]] = [
    ("the fleet and the sandbox answer", fleet_up),
    ("create two products", create_products),
    ("check out with Stripe", checkout_stripe),
    ("check out with Monetbil", checkout_monetbil),
    ("the customer pays the Stripe order", pay_stripe),
    ("the customer pays the Monetbil order", pay_monetbil),
    ("a payment fails", fail_one),
    ("an unpaid order expires", expire_one),
    ("a duplicate storm with late events", duplicate_storm),
    ("each order's timeline", timelines),
    ("the stock ledger", stock_ledger),
    ("where to look next", links),
]


def run_tour(tour: Tour) -> int:
    print(f"payfleet demo against {tour.url} (sandbox {tour.sandbox}), run {tour.run}", flush=True)
    explained = 0
    for number, (title, step) in enumerate(STEPS, start=1):
        print(f"[{number}/{len(STEPS)}] {title}", flush=True)
        try:
            print(f"    ok: {step(tour)}", flush=True)
        except Explained as why:
            explained += 1
            print(f"    explained: {why}", flush=True)
        except StepFailed as failure:
            print(f"    FAILED: {failure}", flush=True)
            print(f"demo failed at step {number}: {title}", flush=True)
            return 1
    note = f" ({explained} explained rather than shown)" if explained else ""
    print(f"demo passed: every one of the {len(STEPS)} steps held{note}", flush=True)
    return 0


def _admin_token(settings: Settings, args: argparse.Namespace) -> str:
    if args.token or settings.admin_token:
        return str(args.token or settings.admin_token)
    kept = Path(".admin-token")  # where `make up` keeps the token it made
    return kept.read_text().strip() if kept.is_file() else ""


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    token = _admin_token(settings, args)
    if not token:
        print(
            "payfleet demo: no admin token: set ADMIN_TOKEN, pass --token, "
            "or run it where `make up` wrote .admin-token",
            file=sys.stderr,
        )
        return 2
    tour = Tour(
        url=(args.url or settings.public_base_url).rstrip("/"),
        sandbox=(args.sandbox or f"http://{settings.sandbox_bind}").rstrip("/"),
        admin={"Authorization": f"Bearer {token}"},
    )
    return run_tour(tour)


def add_commands(commands: Any) -> None:
    demo = commands.add_parser("demo", help="a scripted tour against a running fleet in sandbox mode")
    demo.add_argument("--url", help="the ingress (default PUBLIC_BASE_URL, http://127.0.0.1:8000)")
    demo.add_argument("--sandbox", help="the sandbox (default http://SANDBOX_BIND, http://127.0.0.1:12111)")
    demo.add_argument("--token", help="the admin token (default ADMIN_TOKEN, else ./.admin-token)")
    demo.set_defaults(run=_demo)
