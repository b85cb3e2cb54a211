"""The whole fleet under bad luck: real processes (gunicorn ingress, a
Dramatiq worker, two schedulers for the whole run) reaching PostgreSQL and
RabbitMQ through TCP proxies that the scenarios cut, while Stripe-like
senders keep posting signed webhooks. Payment windows are 8 s and the
stock jobs fire every 5 s, so the expire job pays orders whose intent
succeeded (racing their webhooks) and expires the few abandoned ones. After
each scenario the books of the whole run must balance (tests/chaos/books.py
says what each check catches), no message is dead-lettered and no process
has exited. Each scenario prints its time to
settle and its worst webhook->paid lag (`pytest -s` shows them).

CHAOS_SCALE=full (`make chaos`) cuts RabbitMQ for 20 s and PostgreSQL for
10 s with more orders; the default short form keeps CI fast."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import requests

from tests.chaos.books import assert_books_balance, dead_letters, dsn_of, rows, wait_settled, worst_lag
from tests.chaos.conftest import Scale
from tests.chaos.fleet import Fleet, wait_for
from tests.chaos.traffic import (
    Delivery,
    Placed,
    Senders,
    checkout,
    place_orders,
    put_products,
    skus_of,
    succeeded,
)
from tests.conftest import ADMIN_TOKEN
from tests.fakes.stripe_server import FakeStripe
from tests.support.shop import intent_event

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PLENTY = 100_000
ABANDONED = 6
SETTLE_WITHIN = 90.0
# Promise 10 says a second; the margin is for a loaded two-core CI machine.
ANSWER_WITHIN = 3.0


@dataclass
class Books:
    """The fleet, where to read the truth, and what the truth must be: the
    stock put and the orders paid for, over every scenario so far."""

    fleet: Fleet
    dsn: str
    broker_url: str
    stripe: FakeStripe
    initial: dict[str, int] = field(default_factory=dict)
    paid: set[str] = field(default_factory=set)

    def stock(self, scenario: str) -> tuple[str, ...]:
        """Plenty of five SKUs of the scenario's own, and a few orders nobody
        pays: the expire job expires them while the others are being sold."""
        skus = skus_of(scenario)
        self.put(dict.fromkeys(skus, PLENTY))
        place_orders(self.fleet.base, skus, ABANDONED, seed=0)
        return skus

    def put(self, stock: dict[str, int]) -> None:
        put_products(self.fleet.base, ADMIN, stock)
        self.initial.update(stock)

    def pay(self, orders: Sequence[Placed]) -> list[bytes]:
        """The customers pay: Stripe's intents succeed (the expire job, asking
        about an order past its window, may pay it before its webhook does),
        and each success webhook is ready to send."""
        for placed in orders:
            self.stripe.set_status(placed.intent_id, "succeeded")
        return [succeeded(placed) for placed in orders]

    def check(self, name: str, paid: Sequence[Placed], answered: list[Delivery]) -> None:
        """Settle, then every invariant over the whole run; print the scenario's figures."""
        self.paid |= {placed.order_id for placed in paid}
        assert_stored(self.dsn, answered)
        settle = wait_settled(self.dsn, self.paid, SETTLE_WITHIN)
        lag = worst_lag(self.dsn, first_success_answers(paid, answered))
        assert_books_balance(self.dsn, self.initial, self.paid)
        assert dead_letters(self.broker_url) == {"payments": 0, "jobs": 0, "notifications": 0}
        assert self.fleet.exited() == []
        print(
            f"\nchaos {name}: {len(paid)} orders paid, settled in {settle:.1f} s,"
            f" worst webhook->paid lag {lag:.1f} s, slowest answer {slowest(answered):.2f} s"
        )


@pytest.fixture(scope="module")
def shop(fleet: Fleet, chaos_world: tuple[str, str], chaos_stripe: FakeStripe) -> Books:
    database_url, broker_url = chaos_world
    return Books(fleet, dsn_of(database_url), broker_url, chaos_stripe)


@pytest.fixture
def books(shop: Books) -> Books:
    assert shop.fleet.exited() == [], "a fleet process died in an earlier scenario"
    return shop


def first_success_answers(paid: Sequence[Placed], answered: list[Delivery]) -> dict[str, float]:
    """Order id -> wall clock time of the first 200 for its success event."""
    by_intent = {placed.intent_id: placed.order_id for placed in paid}
    first: dict[str, float] = {}
    for delivery in answered:
        order = by_intent.get(delivery.intent_id)
        if order and delivery.stored_at is not None and delivery.event_type == "payment_intent.succeeded":
            first[order] = min(first.get(order, delivery.stored_at), delivery.stored_at)
    return first


def assert_stored(dsn: str, answered: list[Delivery]) -> None:
    """Promise 1: a 200 means the event is in PostgreSQL."""
    acknowledged = {d.key for d in answered if d.stored_at is not None}
    stored = {
        key
        for (key,) in rows(
            dsn, "SELECT event_key FROM provider_events WHERE event_key = ANY(%s)", list(acknowledged)
        )
    }
    assert acknowledged - stored == set(), f"answered 200 but not stored: {sorted(acknowledged - stored)[:5]}"


def slowest(answered: list[Delivery]) -> float:
    return max((d.slowest for d in answered), default=0.0)


def deliver_through(senders: Senders, bodies: Sequence[bytes], seconds: float) -> None:
    """Feed `bodies` to the senders evenly over `seconds`: load during a whole outage."""
    for body in bodies:
        senders.send([body])
        time.sleep(seconds / max(len(bodies), 1))


def thirds(items: Sequence[bytes]) -> tuple[Sequence[bytes], Sequence[bytes], Sequence[bytes]]:
    third = len(items) // 3
    return items[:third], items[third : 2 * third], items[2 * third :]


def test_broker_cut_under_concurrent_webhooks_loses_nothing(books: Books, scale: Scale) -> None:
    skus = books.stock("BROKER")
    orders = place_orders(books.fleet.base, skus, scale.orders, seed=1)
    before, during, after = thirds(books.pay(orders))
    senders = Senders(books.fleet.base, scale.senders)
    senders.send(before)
    wait_for(lambda: senders.answered() >= len(before) // 2, 60, "load before the cut")
    books.fleet.amqp.cut()
    deliver_through(senders, during, scale.broker_cut_seconds)
    books.fleet.amqp.restore()
    senders.send(after)
    answered = senders.finish()
    assert senders.errors == []
    assert {status for d in answered for status in d.statuses} == {200}, "RabbitMQ away must not cost a 200"
    assert slowest(answered) < ANSWER_WITHIN, "a webhook waited on the broker"
    books.check(f"broker cut {scale.broker_cut_seconds:.0f} s", orders, answered)


def test_worker_killed_mid_backlog_applies_each_event_once_after_restart(books: Books, scale: Scale) -> None:
    skus = books.stock("KILL")
    orders = place_orders(books.fleet.base, skus, scale.backlog, seed=2)
    books.fleet.kill_worker()  # the backlog builds while no worker runs
    senders = Senders(books.fleet.base, scale.senders)
    senders.send(books.pay(orders))
    answered = senders.finish()
    assert senders.errors == []

    books.fleet.start_worker()
    # Killed once a quarter is applied: the rest waits in the queue, in prefetch and in open transactions.
    quarter = processed(books.dsn) + len(orders) // 4
    wait_for(lambda: processed(books.dsn) >= quarter, 60, "the worker applying a quarter", interval=0.02)
    books.fleet.kill_worker()  # mid-backlog: transactions open, messages unacked
    at_kill = len(orders) - pending(books.dsn)
    assert at_kill < len(orders), "the backlog was gone before the kill: make it larger"
    books.fleet.start_worker()
    print(f"\nchaos worker SIGKILL: {at_kill} of {len(orders)} events applied when the group was killed")
    books.check("worker SIGKILL mid-backlog", orders, answered)


def processed(dsn: str) -> int:
    return int(rows(dsn, "SELECT count(*) FROM provider_events WHERE status <> 'received'")[0][0])


def pending(dsn: str) -> int:
    return int(rows(dsn, "SELECT count(*) FROM provider_events WHERE status = 'received'")[0][0])


def test_postgresql_cut_under_load_answers_503_or_a_stored_200(books: Books, scale: Scale) -> None:
    skus = books.stock("PGCUT")
    orders = place_orders(books.fleet.base, skus, scale.orders, seed=3)
    before, during, after = thirds(books.pay(orders))
    senders = Senders(books.fleet.base, scale.senders)
    senders.send(before)
    wait_for(lambda: senders.answered() >= len(before) // 2, 60, "load before the cut")
    books.fleet.pg.cut()
    deliver_through(senders, during, scale.pg_cut_seconds)
    books.fleet.pg.restore()
    senders.send(after)
    answered = senders.finish()
    assert senders.errors == [], "only 200 or 503 may answer a webhook while PostgreSQL is away"
    assert_stored(books.dsn, answered)
    refused = sum(status == 503 for d in answered for status in d.statuses)
    assert refused > 0, "the cut never showed: no webhook was answered 503"
    print(f"\nchaos PostgreSQL cut: {refused} answers were 503, each retried until stored")
    books.check(f"PostgreSQL cut {scale.pg_cut_seconds:.0f} s", orders, answered)


def test_duplicate_storm_with_late_processing_and_failure_leaves_each_order_paid_once(
    books: Books, scale: Scale
) -> None:
    skus = books.stock("STORM")
    orders = place_orders(books.fleet.base, skus, scale.orders, seed=4)
    successes = books.pay(orders)
    senders = Senders(books.fleet.base, scale.senders)
    senders.send(successes)
    first = senders.finish()

    storm = [body for body in successes for _ in range(9)]
    for placed in orders:
        for late in (late_event("processing", placed), late_event("payment_failed", placed)):
            storm += [late] * 10
    random.Random(4).shuffle(storm)
    senders = Senders(books.fleet.base, scale.senders)
    senders.send(storm)
    answered = first + senders.finish()
    assert senders.errors == []
    books.check(f"10x duplicate storm ({len(storm) + len(successes)} deliveries)", orders, answered)


def late_event(kind: str, placed: Placed) -> bytes:
    status = "processing" if kind == "processing" else "requires_payment_method"
    return intent_event(f"payment_intent.{kind}", placed.intent_id, status=status)


def test_concurrent_checkouts_on_the_last_units_sell_exactly_those(books: Books, scale: Scale) -> None:
    sku = "LAST-UNITS"
    books.put({sku: 10})
    answers = race_checkouts(books.fleet.base, sku, scale.checkouts)
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses.count(201) == 10, statuses
    assert statuses.count(409) == scale.checkouts - 10, statuses
    assert {a.json()["error"] for a in answers if a.status_code == 409} == {"insufficient_stock"}

    won = [
        Placed(a.json()["order_id"], a.json()["payment"]["provider_payment_id"], ((sku, 1),))
        for a in answers
        if a.status_code == 201
    ]
    senders = Senders(books.fleet.base, scale.senders)
    senders.send(books.pay(won))
    answered = senders.finish()
    assert senders.errors == []
    books.check(f"{scale.checkouts} checkouts on 10 units", won, answered)


def race_checkouts(base: str, sku: str, count: int) -> list[requests.Response]:
    barrier = threading.Barrier(count)
    answers: list[requests.Response | BaseException | None] = [None] * count

    def one(index: int) -> None:
        barrier.wait()
        try:
            answers[index] = checkout(base, [(sku, 1)])
        except BaseException as error:  # kept, so the assertion shows it
            answers[index] = error

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    failed = [a for a in answers if not isinstance(a, requests.Response)]
    assert failed == [], f"checkouts without an answer: {failed[:3]}"
    return [a for a in answers if isinstance(a, requests.Response)]


def test_two_schedulers_ran_the_whole_run(books: Books) -> None:
    """Both replicas are still up after every outage above, and the slots
    they share (every 5 s here) each fired once."""
    schedulers = [p for p in books.fleet.procs if p.name.startswith("scheduler")]
    assert len(schedulers) == 2 and all(p.alive() for p in schedulers)
    so_far = fired(books.dsn)
    wait_for(lambda: fired(books.dsn) >= so_far + 2, 30, "two more scheduled slots firing")
    assert_books_balance(books.dsn, books.initial, books.paid)
    assert books.fleet.exited() == []
    statuses = dict(rows(books.dsn, "SELECT status, count(*) FROM orders GROUP BY status"))
    by_job = rows(
        books.dsn,
        "SELECT count(*) FROM order_transitions"
        " WHERE subject = 'order' AND to_status = 'paid' AND event_id IS NULL",
    )[0][0]
    print(
        f"\nchaos two schedulers: {fired(books.dsn)} slots fired, orders {statuses}, {by_job} paid by a job"
    )
    assert statuses.get("expired", 0) > 0, "the expire job never expired an abandoned order"


def fired(dsn: str) -> int:
    return int(rows(dsn, "SELECT count(*) FROM scheduled_runs WHERE trigger = 'scheduled'")[0][0])
