"""How the event actor fails (DESIGN.md, Messages; promises 8 and 9): an error
that waiting cannot cure fails at once with its reason; a lock timeout is
retried like any transient error; the time limit really ends a stuck
attempt, which is counted and kept on the event; and no stored reason
carries a parameter's value. Real worker threads, a real second session
holding the row locks, the fake Monetbil answering slowly."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from domain.models import ReviewRequest
from payfleet.platform.broker import build_broker
from payfleet.platform.config import load_settings
from payfleet.platform.db import engine_for, make_sessions
from payfleet.platform.publishing import APPLY_EVENT, SEND_REVIEW_REQUEST
from tests.conftest import eventually, scalar
from tests.fakes.monetbil_server import FakeMonetbil
from tests.support.jobs import completed_order
from tests.support.shop import (
    deliver,
    intent_event,
    monetbil_checkout,
    order,
    place,
    post_callback,
    product,
    put_product,
)
from workers.apply_events import declare_event_actors

StartWorker = Callable[..., tuple[dramatiq.Broker, sessionmaker[Session]]]


@pytest.fixture
def start_worker(env: dict[str, str]) -> Iterator[StartWorker]:
    """Event actors on real worker threads, configured by `overrides` (the
    environment's names), with an engine bounded by those settings."""
    started: list[tuple[dramatiq.Worker, dramatiq.Broker, Any]] = []

    def start(**overrides: str) -> tuple[dramatiq.Broker, sessionmaker[Session]]:
        settings = load_settings({**env, **overrides})
        engine = engine_for(settings)
        sessions = make_sessions(engine)
        broker = build_broker(settings)
        declare_event_actors(broker, sessions, settings)
        broker.emit_after("process_boot")  # as the dramatiq CLI does: starts TimeLimit's watchdog
        worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
        worker.start()
        started.append((worker, broker, engine))
        return broker, sessions

    yield start
    for worker, broker, engine in started:
        worker.stop()
        broker.close()
        engine.dispose()


@pytest.fixture
def holder(database_url: str) -> Iterator[psycopg.Connection]:
    """Another session, as a stuck or slow client would hold rows."""
    with psycopg.connect(database_url.replace("+psycopg", "")) as conn:
        yield conn


def hold_product(conn: psycopg.Connection, sku: str) -> None:
    conn.execute("SELECT 1 FROM products WHERE sku = %s FOR UPDATE", (sku,))


def event(sessions: sessionmaker[Session], event_id: int) -> dict[str, Any]:
    with sessions() as session:
        row = session.execute(
            text("SELECT status, attempts, last_error FROM provider_events WHERE id = :i"), {"i": event_id}
        ).one()
    return dict(row._mapping)


def stored_event(sessions: sessionmaker[Session], key: str) -> int:
    return int(scalar(sessions, "SELECT id FROM provider_events WHERE event_key = :k", k=key))


def waiting_with(sessions: sessionmaker[Session], event_id: int, prefix: str) -> Callable[[], Any]:
    """A check: the event counted a failed attempt with this reason and waits for its retry."""

    def check() -> Any:
        row = event(sessions, event_id)
        failed = row["status"] == "received" and row["attempts"] >= 1
        return row if failed and (row["last_error"] or "").startswith(prefix) else None

    return check


def payments_queues(broker: dramatiq.Broker) -> tuple[int, int, int]:
    """Messages in payments, payments.DQ (delayed retries) and payments.XQ (dead letters)."""
    return broker.get_queue_message_counts("payments")  # type: ignore[attr-defined,no-any-return]


def paid(client: Any, sessions: sessionmaker[Session], order_id: str, body: bytes) -> None:
    key = json.loads(body)["id"]
    row = eventually(
        lambda: (r := event(sessions, stored_event(sessions, key)))["status"] != "received" and r
    )
    assert row["status"] == "processed", row
    assert order(client, order_id)["status"] == "paid"


# --- errors waiting cannot cure ------------------------------------------------------


def insert_event(
    sessions: sessionmaker[Session], provider: str, key: str, event_type: str, payload: Any
) -> int:
    """An event as an older version, or a hand edit, may have left it stored."""
    with sessions.begin() as session:
        return int(
            session.execute(
                text(
                    "INSERT INTO provider_events (provider, event_key, event_type, payload, status, attempts)"
                    " VALUES (:p, :k, :t, CAST(:payload AS jsonb), 'received', 0) RETURNING id"
                ),
                {"p": provider, "k": key, "t": event_type, "payload": json.dumps(payload)},
            ).scalar_one()
        )


@pytest.mark.parametrize(
    "provider, payload",
    [
        ("stripe", {"id": "evt_bad", "type": "payment_intent.succeeded", "data": "not an object"}),
        ("stripe", {"id": "evt_bad", "type": "payment_intent.succeeded", "data": {"object": ["a", "list"]}}),
        ("monetbil", ["a", "list", "not a form"]),
    ],
)
def test_a_malformed_stored_payload_is_tried_once_and_failed_with_its_reason(
    start_worker, sessions, provider, payload
):
    broker, _ = start_worker(EVENT_MAX_ATTEMPTS="3", EVENT_RETRY_DELAYS_SECONDS="0.2")
    event_type = "payment_intent.succeeded" if provider == "stripe" else "failed"
    event_id = insert_event(sessions, provider, f"bad-{provider}", event_type, payload)

    broker.get_actor(APPLY_EVENT).send(event_id)

    row = eventually(lambda: (r := event(sessions, event_id))["status"] != "received" and r)
    assert row["status"] == "failed"
    assert row["last_error"].startswith("MalformedEvent: stored")
    # Not retried: the count stays at one well past the retry delays, and the
    # message waits in the dead-letter queue, not the delay queue.
    eventually(lambda: payments_queues(broker)[2] == 1, timeout=10)
    time.sleep(1.0)
    assert event(sessions, event_id)["attempts"] == 1
    assert payments_queues(broker)[:2] == (0, 0)


def test_a_malformed_event_in_a_batch_fails_alone_and_the_others_apply(start_worker, client, sessions):
    put_product(client, "MAL-1", on_hand=5)
    order_id, intent = place(client, ("MAL-1", 1))
    broker, _ = start_worker()
    bad = insert_event(sessions, "stripe", "evt_malformed", "payment_intent.succeeded", {"data": 7})
    body = intent_event("payment_intent.succeeded", intent)
    broker.get_actor(APPLY_EVENT).send(bad)
    assert deliver(client, body).status_code == 200

    paid(client, sessions, order_id, body)
    row = eventually(lambda: (r := event(sessions, bad))["status"] != "received" and r)
    assert (row["status"], row["attempts"]) == ("failed", 1)


def test_a_value_postgresql_rejects_fails_at_once_and_its_reason_carries_no_parameter(
    start_worker, client, sessions, fake_monetbil: FakeMonetbil
):
    """A verified callback whose transaction_uuid is too long for the payment's
    column: the statement that learns it fails the same way every time."""
    put_product(client, "PAGNE-X", on_hand=5, currency="XAF", price=5000)
    answer = monetbil_checkout(client, ("PAGNE-X", 1))
    assert answer.status_code == 201, answer.text
    order_id = answer.json["order_id"]
    overlong = "uuid-" + "7" * 300
    form = fake_monetbil.pay(order_id, status="failed", transaction_uuid=overlong)
    start_worker()

    assert post_callback(client, form).text == "received"

    event_id = stored_event(sessions, f"{form['transaction_id']}:failed")
    row = eventually(lambda: (r := event(sessions, event_id))["status"] != "received" and r)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert row["last_error"].startswith("StringDataRightTruncation (SQLSTATE 22001")
    assert "7777" not in row["last_error"] and form["transaction_id"] not in row["last_error"]
    assert order(client, order_id)["status"] == "pending_payment"  # rolled back, nothing half done


# --- a lock held too long ----------------------------------------------------------


def test_a_lock_timeout_is_recorded_retried_and_applies_once_the_lock_is_gone(
    start_worker, client, sessions, holder
):
    put_product(client, "LOCKED-1", on_hand=5)
    order_id, intent = place(client, ("LOCKED-1", 2))
    _, _ = start_worker(
        DB_LOCK_TIMEOUT_SECONDS="0.3", EVENT_MAX_ATTEMPTS="10", EVENT_RETRY_DELAYS_SECONDS="0.2"
    )
    hold_product(holder, "LOCKED-1")  # as a stuck session would, longer than the lock timeout
    body = intent_event("payment_intent.succeeded", intent)
    started = time.monotonic()
    assert deliver(client, body).status_code == 200
    event_id = stored_event(sessions, json.loads(body)["id"])

    row = eventually(waiting_with(sessions, event_id, "LockNotAvailable (SQLSTATE 55P03"), timeout=10)
    assert time.monotonic() - started < 5
    assert order(client, order_id)["status"] == "pending_payment"

    holder.rollback()  # the lock is released: the next retry applies it
    paid(client, sessions, order_id, body)
    assert event(sessions, event_id)["attempts"] > row["attempts"]
    after = product(client, "LOCKED-1")
    assert (after["on_hand"], after["reserved"]) == (3, 0)


# --- the time limit ----------------------------------------------------------------


def test_the_time_limit_ends_an_attempt_stuck_on_a_lock_and_it_is_retried(
    start_worker, client, sessions, holder
):
    """No lock or statement timeout of the session's own: only the actor's
    time limit can end the wait."""
    put_product(client, "STUCK-1", on_hand=5)
    order_id, intent = place(client, ("STUCK-1", 1))
    start_worker(
        EVENT_TIME_LIMIT_SECONDS="1.5",
        DB_LOCK_TIMEOUT_SECONDS="0",
        DB_STATEMENT_TIMEOUT_SECONDS="0",
        EVENT_MAX_ATTEMPTS="10",
        EVENT_RETRY_DELAYS_SECONDS="0.2",
    )
    hold_product(holder, "STUCK-1")
    body = intent_event("payment_intent.succeeded", intent)
    started = time.monotonic()
    assert deliver(client, body).status_code == 200
    event_id = stored_event(sessions, json.loads(body)["id"])

    eventually(
        waiting_with(sessions, event_id, "TimeLimitExceeded: the attempt ran past its 1.5 s"), timeout=8
    )
    assert time.monotonic() - started < 6  # without the bound it waits as long as the lock is held

    holder.rollback()
    paid(client, sessions, order_id, body)


def test_an_attempt_stuck_past_the_time_limit_every_time_is_given_up_with_its_reason(
    start_worker, client, sessions, holder
):
    put_product(client, "STUCK-2", on_hand=5)
    order_id, intent = place(client, ("STUCK-2", 1))
    start_worker(
        EVENT_TIME_LIMIT_SECONDS="1",
        DB_LOCK_TIMEOUT_SECONDS="0",
        DB_STATEMENT_TIMEOUT_SECONDS="0",
        EVENT_MAX_ATTEMPTS="2",
        EVENT_RETRY_DELAYS_SECONDS="0.2",
    )
    hold_product(holder, "STUCK-2")
    body = intent_event("payment_intent.succeeded", intent)
    assert deliver(client, body).status_code == 200
    event_id = stored_event(sessions, json.loads(body)["id"])

    row = eventually(lambda: (r := event(sessions, event_id))["status"] != "received" and r, timeout=15)
    # Its payment exists: failed, not unmatched, whatever the text of the error.
    assert (row["status"], row["attempts"]) == ("failed", 2)
    assert row["last_error"].startswith("TimeLimitExceeded")
    holder.rollback()
    assert order(client, order_id)["status"] == "pending_payment"


def test_the_time_limit_ends_an_attempt_waiting_on_a_slow_provider_and_counts_it(
    start_worker, client, sessions, fake_monetbil: FakeMonetbil
):
    """Check-payment answers after the time limit: Dramatiq's TimeLimitExceeded
    (a BaseException) ends the attempt, which is recorded all the same."""
    put_product(client, "SLOW-1", on_hand=5, currency="XAF", price=5000)
    answer = monetbil_checkout(client, ("SLOW-1", 1))
    assert answer.status_code == 201, answer.text
    order_id = answer.json["order_id"]
    form = fake_monetbil.pay(order_id)  # a success: confirmed with check-payment first
    fake_monetbil.delay(3.0)
    start_worker(
        EVENT_TIME_LIMIT_SECONDS="1.5",
        MONETBIL_TIMEOUT_SECONDS="10",
        EVENT_MAX_ATTEMPTS="10",
        EVENT_RETRY_DELAYS_SECONDS="0.2",
    )

    assert post_callback(client, form).text == "received"
    event_id = stored_event(sessions, f"{form['transaction_id']}:success")

    row = eventually(waiting_with(sessions, event_id, "TimeLimitExceeded"), timeout=10)
    assert row["last_error"] == "TimeLimitExceeded: the attempt ran past its 1.5 s time limit"
    fake_monetbil.delay(0)
    row = eventually(lambda: (r := event(sessions, event_id))["status"] != "received" and r, timeout=20)
    assert row["status"] == "processed"
    assert order(client, order_id)["status"] == "paid"


# --- the review sender ------------------------------------------------------------


def pending_review_request(sessions: sessionmaker[Session]) -> int:
    """A completed order's review request, waiting to be sent."""
    order_id = completed_order(sessions, days_ago=8)
    with sessions.begin() as session:
        request = ReviewRequest(order_id=order_id, phone="+33611111111", status="pending", attempts=0)
        session.add(request)
        session.flush()
        return int(request.id)


def test_a_review_request_given_up_says_it_gave_up_and_why(sessions, settings, worker, fake_whatsapp):
    fake_whatsapp.fail_all(503)
    request_id = pending_review_request(sessions)

    worker.broker.get_actor(SEND_REVIEW_REQUEST).send(request_id)

    def given_up() -> Any:
        with sessions() as session:
            request = session.get_one(ReviewRequest, request_id)
        return request.status == "failed" and request

    request = eventually(given_up, timeout=20)
    assert request.attempts == settings.notification_max_attempts == 3
    assert request.last_error.startswith("gave up after 3 attempts; last: ")
    assert "503" in request.last_error
