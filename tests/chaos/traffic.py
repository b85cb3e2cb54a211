"""Load the chaos scenarios put on the ingress: checkouts, and signed Stripe
webhooks sent by concurrent senders that behave like Stripe (a 503 is
retried until it is a 200). Each answer is kept, so a scenario can check
what the ingress promised against what PostgreSQL holds."""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

from tests.support.shop import SECRET, intent_event
from tests.support.stripe_signing import sign_stripe_payload

RETRY_AFTER_503 = 0.2  # Stripe backs off for longer; the promise is the same
GIVE_UP_AFTER = 180.0


def skus_of(scenario: str) -> tuple[str, ...]:
    """Five SKUs of a scenario's own: the scenarios share one database."""
    return tuple(f"{scenario}-{letter}" for letter in "ABCDE")


@dataclass(frozen=True)
class Placed:
    order_id: str
    intent_id: str
    lines: tuple[tuple[str, int], ...]


def put_products(base: str, admin: dict[str, str], stock: dict[str, int]) -> None:
    for sku, on_hand in stock.items():
        body = {"name": sku, "price": 1200, "currency": "EUR", "on_hand": on_hand}
        answer = requests.put(f"{base}/admin/products/{sku}", json=body, headers=admin, timeout=30)
        assert answer.status_code in (200, 201), answer.text


def checkout(base: str, lines: Sequence[tuple[str, int]], session: requests.Session | None = None) -> Any:
    body = {
        "items": [{"sku": sku, "quantity": quantity} for sku, quantity in lines],
        "provider": "stripe",
        "currency": "EUR",
        "customer": {"email": "chaos@example.com", "phone": "+33600000000"},
    }
    return (session or requests).post(f"{base}/checkout", json=body, timeout=60)


def random_lines(rng: random.Random, skus: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """One to three lines on distinct SKUs: orders that share rows, locked in SKU order."""
    chosen = rng.sample(list(skus), rng.randint(1, 3))
    return tuple((sku, rng.randint(1, 2)) for sku in chosen)


def place_orders(base: str, skus: Sequence[str], count: int, seed: int, workers: int = 16) -> list[Placed]:
    rng = random.Random(seed)
    wanted = [random_lines(rng, skus) for _ in range(count)]

    def place(lines: tuple[tuple[str, int], ...]) -> Placed:
        answer = checkout(base, lines)
        for _ in range(10):  # a busy shared PostgreSQL server answers 503: a customer tries again
            if answer.status_code != 503:
                break
            time.sleep(1)
            answer = checkout(base, lines)
        assert answer.status_code == 201, answer.text
        body = answer.json()
        return Placed(body["order_id"], body["payment"]["provider_payment_id"], lines)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(place, wanted))


def succeeded(placed: Placed) -> bytes:
    return intent_event("payment_intent.succeeded", placed.intent_id)


@dataclass
class Delivery:
    key: str
    event_type: str
    intent_id: str
    statuses: list[int] = field(default_factory=list)
    stored_at: float | None = None  # wall clock of the first 200
    slowest: float = 0.0


class Senders:
    """`count` threads posting queued webhook bodies, each until a 200."""

    def __init__(self, base: str, count: int = 16) -> None:
        self.url = f"{base}/webhooks/stripe"
        self.deliveries: list[Delivery] = []
        self.errors: list[str] = []
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        for thread in self._threads:
            thread.start()

    def send(self, bodies: Iterable[bytes]) -> None:
        for body in bodies:
            self._queue.put(body)

    def answered(self) -> int:
        with self._lock:
            return len(self.deliveries)

    def finish(self) -> list[Delivery]:
        """Wait until every queued body was answered 200 (or given up on)."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(GIVE_UP_AFTER + 30)
        assert not any(thread.is_alive() for thread in self._threads), "a sender never finished"
        return self.deliveries

    def _run(self) -> None:
        session = requests.Session()
        while (body := self._queue.get()) is not None:
            delivery = self._deliver(session, body)
            with self._lock:
                self.deliveries.append(delivery)

    def _deliver(self, session: requests.Session, body: bytes) -> Delivery:
        event = json.loads(body)
        delivery = Delivery(event["id"], event["type"], event["data"]["object"]["id"])
        give_up = time.monotonic() + GIVE_UP_AFTER
        while time.monotonic() < give_up:
            status, took = self._post(session, body)
            delivery.statuses.append(status)
            delivery.slowest = max(delivery.slowest, took)
            if status == 200:
                delivery.stored_at = time.time()
                return delivery
            if status != 503:  # anything else breaks the promise: no retry hides it
                self._error(f"{delivery.key}: answered {status}")
                return delivery
            time.sleep(RETRY_AFTER_503)
        self._error(f"{delivery.key}: no 200 within {GIVE_UP_AFTER:.0f} s ({delivery.statuses[-5:]})")
        return delivery

    def _post(self, session: requests.Session, body: bytes) -> tuple[int, float]:
        headers = {"Stripe-Signature": sign_stripe_payload(body, SECRET), "Content-Type": "application/json"}
        started = time.monotonic()
        try:
            answer = session.post(self.url, data=body, headers=headers, timeout=30)
        except requests.RequestException as error:
            self._error(f"no answer: {type(error).__name__}: {error}")
            return 0, time.monotonic() - started
        return answer.status_code, time.monotonic() - started

    def _error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)
