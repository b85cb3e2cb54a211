"""Nothing is lost when RabbitMQ goes away in the middle of a requeue: a
letter is acknowledged only after its message was confirmed, so each one
is either back on its queue (and applied) or still a dead letter, and a
second requeue finishes the job."""

from __future__ import annotations

import threading
from typing import Any

import pika
import pytest
from sqlalchemy import text

from payfleet.cli.main import main
from payfleet.platform import dead_letter_queues as dead_letters
from tests.conftest import eventually, scalar
from tests.support.shop import checkout, deliver, intent_event, put_product
from tests.support.tcp_proxy import TcpProxy

LETTERS = 12


def depth(rabbit: pika.URLParameters) -> int:
    connection = pika.BlockingConnection(rabbit)
    try:
        return int(connection.channel().queue_declare("payments.XQ", passive=True).method.message_count)
    finally:
        connection.close()


def statuses(sessions: Any) -> dict[str, int]:
    with sessions() as session:
        return dict(
            session.execute(text("SELECT status, count(*) FROM provider_events GROUP BY status")).all()
        )


def test_rabbitmq_cut_midway_through_a_requeue_loses_no_letter(
    client, sessions, worker, settings, env, monkeypatch: pytest.MonkeyPatch, capsys
):
    rabbit = dead_letters.parameters_for(settings)
    put_product(client, "SCARF", on_hand=LETTERS)
    orders = [checkout(client, ("SCARF", 1)).json["order_id"] for _ in range(LETTERS)]
    for n in range(LETTERS):
        assert deliver(client, intent_event("payment_intent.succeeded", f"pi_cut_{n}")).status_code == 200
    eventually(lambda: depth(rabbit) == LETTERS, timeout=30)
    # The cause, fixed: each payment learns its PaymentIntent.
    with sessions.begin() as session:
        for n, order_id in enumerate(orders):
            session.execute(
                text("UPDATE payments SET provider_payment_id = :pi WHERE order_id = :o"),
                {"pi": f"pi_cut_{n}", "o": order_id},
            )

    with TcpProxy("127.0.0.1", 5672) as proxy:
        for name, value in {**env, "BROKER_URL": proxy.url_for(env["BROKER_URL"])}.items():
            monkeypatch.setenv(name, value)
        cut = threading.Timer(1.0, proxy.cut)
        cut.start()
        try:
            code = main(["dead-letters", "requeue", "--all", "--rate", "4/s"])
        finally:
            cut.cancel()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "connection to RabbitMQ lost" in out
    moved = int(out.split("requeued ")[-1].split()[0])
    assert 0 < moved < LETTERS, out

    # Each letter is applied or still a dead letter: none is lost.
    eventually(lambda: statuses(sessions).get("processed", 0) >= moved)
    processed = statuses(sessions).get("processed", 0)
    assert depth(rabbit) >= LETTERS - processed

    monkeypatch.setenv("BROKER_URL", env["BROKER_URL"])
    assert main(["dead-letters", "requeue", "--all"]) == 0
    eventually(lambda: statuses(sessions) == {"processed": LETTERS}, timeout=30)
    assert scalar(sessions, "SELECT count(*) FROM orders WHERE status = 'paid'") == LETTERS
    # A letter whose message was confirmed but not yet acknowledged when the
    # connection went is still there, and says its event is applied already.
    assert all("is processed" in reason for _, reason in _left(rabbit, sessions, settings))


def _left(rabbit: pika.URLParameters, sessions: Any, settings: Any) -> list[tuple[Any, str]]:
    revive = dead_letters.reviver(sessions, dead_letters.job_actors(settings))
    return dead_letters.requeue(rabbit, revive, ("payments",), dry_run=True).left


def test_rabbitmq_cut_midway_through_an_archive_loses_no_letter_and_stores_none_twice(
    client, sessions, engine, worker, settings, env, monkeypatch: pytest.MonkeyPatch, capsys
):
    rabbit = dead_letters.parameters_for(settings)
    for n in range(LETTERS):
        assert deliver(client, intent_event("payment_intent.succeeded", f"pi_arc_{n}")).status_code == 200
    eventually(lambda: depth(rabbit) == LETTERS, timeout=30)

    with TcpProxy("127.0.0.1", 5672) as proxy:
        for name, value in {**env, "BROKER_URL": proxy.url_for(env["BROKER_URL"])}.items():
            monkeypatch.setenv(name, value)
        # The archive's insert waits behind a lock; RabbitMQ goes away
        # meanwhile; the insert then commits, and the acks cannot go out.
        with engine.connect() as holder:
            holder.execute(text("LOCK TABLE dead_letter_archive IN ACCESS EXCLUSIVE MODE"))
            archiving = threading.Thread(target=main, args=(["dead-letters", "archive"],))
            archiving.start()
            eventually(lambda: scalar(sessions, WAITING_FOR_A_LOCK) >= 1)
            proxy.cut()
            holder.commit()
        archiving.join(30)
    capsys.readouterr()
    assert scalar(sessions, "SELECT count(*) FROM dead_letter_archive") == LETTERS
    eventually(lambda: depth(rabbit) == LETTERS)  # unacknowledged: still dead letters

    monkeypatch.setenv("BROKER_URL", env["BROKER_URL"])
    assert main(["dead-letters", "archive"]) == 0
    assert depth(rabbit) == 0
    assert scalar(sessions, "SELECT count(*) FROM dead_letter_archive") == LETTERS


WAITING_FOR_A_LOCK = (
    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
)
