"""Promise 7: a message that exhausts its retries lands in its dead-letter
queue with its error, and one command puts it back without loss."""

from __future__ import annotations

import os
import subprocess
import sys

import pika
import pytest
from sqlalchemy import text

from payfleet.platform import dead_letter_queues as dead_letters
from payfleet.platform.broker import build_broker
from tests.conftest import eventually, scalar
from tests.support.shop import ADMIN, checkout, deliver, intent_event, order, put_product


@pytest.fixture
def broker(settings):
    running = build_broker(settings)
    yield running
    running.close()


def _payfleet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "payfleet.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _unmatched_event(client, sessions) -> int:
    """A succeeded event for a PaymentIntent this database does not know."""
    assert deliver(client, intent_event("payment_intent.succeeded", "pi_late")).status_code == 200
    event_id = int(scalar(sessions, "SELECT id FROM provider_events"))
    eventually(lambda: scalar(sessions, "SELECT status FROM provider_events") == "unmatched")
    return event_id


def _adopt_intent(sessions, order_id: str, intent_id: str) -> None:
    """The checkout's late commit: the payment learns its PaymentIntent id."""
    with sessions() as session:
        session.execute(
            text("UPDATE payments SET provider_payment_id = :pi WHERE order_id = :o"),
            {"pi": intent_id, "o": order_id},
        )
        session.commit()


def test_exhausted_message_lands_in_the_dead_letter_queue_with_its_error(client, sessions, worker, broker):
    event_id = _unmatched_event(client, sessions)
    assert scalar(sessions, "SELECT attempts FROM provider_events") == 3
    assert scalar(sessions, "SELECT last_error FROM provider_events").startswith("PaymentNotFound")

    letters = eventually(lambda: dead_letters.list_dead(broker, "payments"))
    assert [(d.actor, d.args, d.retries) for d in letters] == [("apply_event", (event_id,), 2)]
    assert "PaymentNotFound" in letters[0].error
    # Listing removes nothing.
    assert len(dead_letters.list_dead(broker, "payments")) == 1


def test_one_command_requeues_a_dead_letter_and_the_event_is_applied(client, sessions, worker, broker, env):
    put_product(client, "SCARF", on_hand=3)
    placed = checkout(client, ("SCARF", 1)).json
    _unmatched_event(client, sessions)
    eventually(lambda: dead_letters.list_dead(broker, "payments"))
    _adopt_intent(sessions, placed["order_id"], "pi_late")

    result = _payfleet(env, "dead-letters", "requeue", "--all")
    assert result.returncode == 0, result.stderr
    assert "requeued 1 message" in result.stdout

    eventually(lambda: order(client, placed["order_id"])["status"] == "paid")
    assert scalar(sessions, "SELECT status FROM provider_events") == "processed"
    assert dead_letters.list_dead(broker, "payments") == []
    assert scalar(sessions, "SELECT count(*) FROM stock_movements WHERE type = 'sale'") == 1


def test_requeue_by_id_leaves_the_other_dead_letters_in_place(client, sessions, worker, broker):
    for intent in ("pi_a", "pi_b"):
        deliver(client, intent_event("payment_intent.succeeded", intent))
    letters = eventually(lambda: len(found := dead_letters.list_dead(broker, "payments")) == 2 and found)
    moved = dead_letters.requeue(broker, "payments", message_ids={letters[0].message_id})
    assert [d.message_id for d in moved] == [letters[0].message_id]
    # The requeued one fails again (still unmatched) only after a fresh set of retries.
    remaining = dead_letters.list_dead(broker, "payments")
    assert letters[1].message_id in {d.message_id for d in remaining}


def test_purge_needs_yes_and_then_empties_the_dead_letter_queue(client, sessions, worker, broker, env):
    _unmatched_event(client, sessions)
    eventually(lambda: dead_letters.list_dead(broker, "payments"))
    refused = _payfleet(env, "dead-letters", "purge")
    assert refused.returncode == 2
    assert len(dead_letters.list_dead(broker, "payments")) == 1
    purged = _payfleet(env, "dead-letters", "purge", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert dead_letters.list_dead(broker, "payments") == []


def test_admin_replay_reopens_an_unmatched_event_and_refuses_a_processed_one(client, sessions, worker):
    put_product(client, "GLOVE", on_hand=2)
    placed = checkout(client, ("GLOVE", 1)).json
    event_id = _unmatched_event(client, sessions)
    _adopt_intent(sessions, placed["order_id"], "pi_late")

    replayed = client.simulate_post(f"/admin/events/{event_id}/replay", headers=ADMIN)
    assert replayed.status_code == 202, replayed.text
    assert replayed.json == {"id": event_id, "status": "received", "published": True}
    eventually(lambda: order(client, placed["order_id"])["status"] == "paid")

    again = client.simulate_post(f"/admin/events/{event_id}/replay", headers=ADMIN)
    assert again.status_code == 409
    assert again.json["error"] == "conflict"
    assert client.simulate_post("/admin/events/999999/replay", headers=ADMIN).status_code == 404
    assert client.simulate_post(f"/admin/events/{event_id}/replay").status_code == 401


def test_a_dead_letter_that_is_not_a_dramatiq_message_is_listed_not_fatal(broker, settings):
    broker.declare_queue("payments", ensure=True)
    connection = pika.BlockingConnection(broker.parameters)
    connection.channel().basic_publish(
        "", "payments.XQ", b"not json", pika.BasicProperties(message_id="junk-1")
    )
    connection.close()
    [letter] = dead_letters.list_dead(broker, "payments")
    assert (letter.message_id, letter.actor) == ("junk-1", "(undecodable)")
    assert dead_letters.requeue(broker, "payments") == []
    assert len(dead_letters.list_dead(broker, "payments")) == 1, "left in place, not lost"
