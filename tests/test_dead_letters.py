"""Promise 7: a message that exhausts its retries lands in its dead-letter
queue with its error, and the operator can find, understand, requeue,
archive or purge it, on all three queues, without loss.

The letters are made by the real actors failing for real on the test vhost:
an event whose payment is unknown (payments), a job run stopped by its time
limit while Stripe is slow (jobs), a review request the WhatsApp API keeps
refusing (notifications). The commands run as the operator runs them:
`payfleet dead-letters …`, in this process, with the test's environment."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pika
import pytest
from sqlalchemy import text

from domain import job_runs
from payfleet.cli.main import main
from payfleet.platform import dead_letter_queues as dead_letters
from payfleet.platform.broker import build_broker
from payfleet.platform.config import Settings, load_settings
from payfleet.platform.publishing import QUEUES, run_message
from tests.conftest import _rabbitmqctl, eventually, scalar
from tests.support.jobs import completed_order, job_runner, run_job
from tests.support.shop import ADMIN, checkout, deliver, intent_event, order, put_product
from workers.apply_events import declare_event_actors
from workers.job_runner import declare_job_actors, job_gateways

SWEEP = "cleanup-stale-payment-intents"


@pytest.fixture
def limited(env: dict[str, str]) -> dict[str, str]:
    """Job runs stopped after a second: a slow Stripe makes a job fail."""
    return {**env, "JOB_TIME_LIMIT_SECONDS": "1"}


@pytest.fixture
def worker(limited: dict[str, str], sessions: Any) -> Iterator[dramatiq.Worker]:
    """Real workers for the three queues, with their time limits running."""
    settings = load_settings(limited)
    broker = build_broker(settings)
    declare_event_actors(broker, sessions, settings)
    declare_job_actors(broker, sessions, settings, job_gateways(settings))
    broker.emit_after("process_boot")  # as the dramatiq CLI does: starts TimeLimit's watchdog
    running = dramatiq.Worker(broker, worker_threads=4, worker_timeout=100)
    running.start()
    yield running
    running.stop()
    broker.close()


@pytest.fixture
def broker(settings: Settings) -> Iterator[Any]:
    running = build_broker(settings)
    yield running
    running.close()


@pytest.fixture
def rabbit(settings: Settings) -> pika.URLParameters:
    return dead_letters.parameters_for(settings)


@pytest.fixture
def payfleet(
    limited: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str]]:
    """`payfleet ARGS…` as the operator runs it: (exit code, stdout)."""
    for name, value in limited.items():
        monkeypatch.setenv(name, value)

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse refusing the arguments
            code = int(exit.code or 0)
        return code, capsys.readouterr().out

    return run


def depth(rabbit: pika.URLParameters, queue: str) -> int:
    connection = pika.BlockingConnection(rabbit)
    try:
        return int(connection.channel().queue_declare(f"{queue}.XQ", passive=True).method.message_count)
    finally:
        connection.close()


def json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


# --- making real dead letters ----------------------------------------------------


def event_letter(client: Any, sessions: Any, rabbit: pika.URLParameters, intent: str = "pi_late") -> int:
    """A succeeded event for a PaymentIntent this database does not know."""
    assert deliver(client, intent_event("payment_intent.succeeded", intent)).status_code == 200
    event_id = int(
        scalar(sessions, "SELECT id FROM provider_events WHERE provider_payment_id = :pi", pi=intent)
    )
    eventually(
        lambda: (
            scalar(sessions, "SELECT status FROM provider_events WHERE id = :id", id=event_id) == "unmatched"
        )
    )
    eventually(lambda: depth(rabbit, "payments") >= 1)
    return event_id


def job_letter(sessions: Any, broker: Any, fake_stripe: Any, rabbit: pika.URLParameters) -> int:
    """A run of the Stripe sweep stopped by its time limit: Stripe answers
    after 4 s, the job may take 1. Not retried: dead at once."""
    fake_stripe.delay(4)
    with sessions() as session:
        run_id = job_runs.create_manual(session, SWEEP)
        session.commit()
    broker.enqueue(run_message("cleanup_stale_payment_intents", run_id))
    eventually(lambda: run_state(sessions, run_id) == "failed", timeout=20)
    eventually(lambda: depth(rabbit, "jobs") == 1)
    return run_id


def run_state(sessions: Any, run_id: int) -> str:
    return str(scalar(sessions, "SELECT state FROM scheduled_runs WHERE id = :id", id=run_id))


def review_letter(sessions: Any, settings: Settings, fake_whatsapp: Any, rabbit: pika.URLParameters) -> int:
    """A review request the WhatsApp API refuses three times (503)."""
    fake_whatsapp.fail_all(503)
    completed_order(sessions, days_ago=7.5)
    with job_runner(sessions, settings) as runner:
        run_job(runner, sessions, "request-reviews")
    request_id = int(scalar(sessions, "SELECT id FROM review_requests"))
    eventually(lambda: review_status(sessions, request_id) == "failed", timeout=20)
    eventually(lambda: depth(rabbit, "notifications") == 1)
    return request_id


def review_status(sessions: Any, request_id: int) -> str:
    return str(scalar(sessions, "SELECT status FROM review_requests WHERE id = :id", id=request_id))


def adopt_intent(sessions: Any, order_id: str, intent_id: str) -> None:
    """The checkout's late commit: the payment learns its PaymentIntent id."""
    with sessions() as session:
        session.execute(
            text("UPDATE payments SET provider_payment_id = :pi WHERE order_id = :o"),
            {"pi": intent_id, "o": order_id},
        )
        session.commit()


@pytest.fixture
def three_letters(
    client, sessions, settings, worker, broker, rabbit, fake_stripe, fake_whatsapp
) -> dict[str, int]:
    """One real dead letter on each queue; returns the rows they are about."""
    letters = {
        "event": event_letter(client, sessions, rabbit),
        "run": job_letter(sessions, broker, fake_stripe, rabbit),
        "review": review_letter(sessions, settings, fake_whatsapp, rabbit),
    }
    assert {queue: depth(rabbit, queue) for queue in QUEUES} == {"payments": 1, "jobs": 1, "notifications": 1}
    return letters


def state_of(sessions: Any, letters: dict[str, int]) -> tuple[str, str, str]:
    event = scalar(sessions, "SELECT status FROM provider_events WHERE id = :id", id=letters["event"])
    return event, run_state(sessions, letters["run"]), review_status(sessions, letters["review"])


# --- list and summary ------------------------------------------------------------


def test_list_shows_each_letter_with_its_error_and_removes_nothing(three_letters, payfleet, rabbit):
    code, out = payfleet("dead-letters", "list", "--json")
    assert code == 0
    found = {letter["queue"]: letter for letter in json_lines(out)}
    assert set(found) == set(QUEUES)
    event, run, review = found["payments"], found["jobs"], found["notifications"]
    assert (event["actor"], event["args"], event["retries"]) == ("apply_event", [three_letters["event"]], 2)
    assert "PaymentNotFound" in event["error"]
    # A time limit is never retried, so the message carries no traceback:
    # the error shown is the one the run recorded.
    assert (run["actor"], run["args"]) == ("cleanup_stale_payment_intents", [three_letters["run"]])
    assert "TimeLimitExceeded" in run["error"]
    assert review["actor"] == "send_review_request" and "503" in review["error"]
    assert all(0 <= letter["age_seconds"] < 120 and letter["message_id"] for letter in found.values())
    # The text form: one line per letter.
    code, out = payfleet("dead-letters", "list")
    assert code == 0 and len(out.splitlines()) == 3
    assert "apply_event(" in out and "retries=2" in out
    assert {queue: depth(rabbit, queue) for queue in QUEUES} == {"payments": 1, "jobs": 1, "notifications": 1}


def publish_letters(rabbit: pika.URLParameters, numbers: range) -> None:
    """Letters of apply_event(n) put straight on payments.XQ, as Dramatiq
    dead-letters them, without a hundred real failures first."""
    connection = pika.BlockingConnection(rabbit)
    try:
        channel = connection.channel()
        for number in numbers:
            args, options = (number,), {"retries": 2}
            message: dramatiq.Message[Any] = dramatiq.Message(
                queue_name="payments", actor_name="apply_event", args=args, kwargs={}, options=options
            )
            properties = pika.BasicProperties(delivery_mode=2, message_id=message.message_id)
            channel.basic_publish("", "payments.XQ", message.encode(), properties)
    finally:
        connection.close()


def test_many_letters_are_each_listed_once_and_letters_dying_meanwhile_stay(broker, rabbit, payfleet):
    """A listing takes the letters there when it starts, through one consumer
    that RabbitMQ pushes them to: in order, none twice, none removed, and the
    letters that die while it runs are not lost."""
    broker.declare_queue("payments", ensure=True)
    publish_letters(rabbit, range(1, 1001))
    meanwhile = threading.Thread(target=publish_letters, args=(rabbit, range(1001, 1301)))
    meanwhile.start()
    letters = dead_letters.list_dead(rabbit, ("payments",))
    meanwhile.join()
    numbers = [letter.args[0] for letter in letters]
    assert len(numbers) >= 1000
    assert numbers == list(range(1, len(numbers) + 1))  # in order, from the first, none twice
    # RabbitMQ puts the letters of the closed listing back on its own time.
    eventually(lambda: depth(rabbit, "payments") == 1300)
    code, out = payfleet("dead-letters", "archive", "--limit", "10")
    assert code == 0 and "archived 10 message(s)" in out
    eventually(lambda: depth(rabbit, "payments") == 1290)
    left = dead_letters.list_dead(rabbit, ("payments",))
    assert [letter.args[0] for letter in left] == list(range(11, 1301))


FILTERS = [
    (("--queue", "jobs"), {"jobs"}),
    (("--actor", "send_review_request"), {"notifications"}),
    (("--actor", "apply_event", "--queue", "jobs"), set()),
    (("--error", "paymentnotfound"), {"payments"}),
    (("--error", "TimeLimitExceeded"), {"jobs"}),
    (("--older-than", "1h"), set()),
    (("--older-than", "0s"), set(QUEUES)),
]


def test_list_filters(three_letters, payfleet):
    for filters, queues in FILTERS:
        code, out = payfleet("dead-letters", "list", "--json", *filters)
        assert code == 0
        assert {letter["queue"] for letter in json_lines(out)} == queues, filters


def test_list_limit_and_summary(three_letters, payfleet):
    assert len(json_lines(payfleet("dead-letters", "list", "--json", "--limit", "2")[1])) == 2
    code, out = payfleet("dead-letters", "summary", "--json")
    assert code == 0
    summaries = {summary["queue"]: summary for summary in json_lines(out)}
    assert summaries["payments"]["count"] == 1
    assert summaries["payments"]["by_actor"] == {"apply_event": 1}
    assert [error for error in summaries["jobs"]["by_error"] if "TimeLimitExceeded" in error]
    assert summaries["notifications"]["by_actor"] == {"send_review_request": 1}
    assert all(0 <= summary["oldest_age_seconds"] < 120 for summary in summaries.values())
    code, out = payfleet("dead-letters", "summary", "--queue", "payments")
    assert code == 0 and out.startswith("payments: 1 letter(s)") and "actor apply_event: 1" in out


# --- requeue -------------------------------------------------------------------------


def test_a_dry_run_shows_what_would_move_and_changes_nothing(three_letters, payfleet, sessions, rabbit):
    before = state_of(sessions, three_letters)
    assert before == ("unmatched", "failed", "failed")
    code, out = payfleet("dead-letters", "requeue", "--all", "--dry-run")
    assert code == 0, out
    assert out.count("would requeue: ") == 3
    assert "would requeue 3 message(s), would leave 0" in out
    code, out = payfleet("dead-letters", "requeue", "--all", "--dry-run", "--limit", "1", "--queue", "jobs")
    assert code == 0 and "would requeue 1 message(s), would leave 0" in out and "cleanup_stale" in out
    assert state_of(sessions, three_letters) == before
    assert {queue: depth(rabbit, queue) for queue in QUEUES} == {"payments": 1, "jobs": 1, "notifications": 1}


def test_a_requeue_really_runs_each_letter_again_once_the_cause_is_fixed(
    three_letters, payfleet, client, sessions, rabbit, fake_stripe, fake_whatsapp
):
    # The causes, fixed: the payment's checkout commits, Stripe is fast
    # again, the WhatsApp API is back.
    put_product(client, "SCARF", on_hand=3)
    placed = checkout(client, ("SCARF", 1)).json
    adopt_intent(sessions, placed["order_id"], "pi_late")
    fake_stripe.delay(None)
    fake_whatsapp.heal()

    code, out = payfleet("dead-letters", "requeue", "--all")
    assert code == 0, out
    assert "requeued 3 message(s), left 0" in out

    eventually(lambda: order(client, placed["order_id"])["status"] == "paid")
    eventually(lambda: state_of(sessions, three_letters) == ("processed", "succeeded", "sent"), timeout=20)
    assert (
        scalar(sessions, "SELECT attempts FROM scheduled_runs WHERE id = :id", id=three_letters["run"]) == 2
    )
    assert [message.to for message in fake_whatsapp.messages] == ["whatsapp:+33611111111"]
    assert {queue: depth(rabbit, queue) for queue in QUEUES} == {"payments": 0, "jobs": 0, "notifications": 0}


def test_requeue_by_id_and_filters_leaves_the_other_letters(
    three_letters, payfleet, sessions, rabbit, fake_whatsapp
):
    [review] = json_lines(payfleet("dead-letters", "list", "--json", "--queue", "notifications")[1])
    fake_whatsapp.heal()
    code, out = payfleet("dead-letters", "requeue", "--id", review["message_id"])
    assert code == 0 and "requeued 1 message(s)" in out
    eventually(lambda: review_status(sessions, three_letters["review"]) == "sent")
    code, out = payfleet("dead-letters", "requeue", "--all", "--error", "no such error")
    assert code == 0 and "requeued 0 message(s)" in out
    assert (depth(rabbit, "payments"), depth(rabbit, "jobs"), depth(rabbit, "notifications")) == (1, 1, 0)


def test_a_requeued_letter_gets_a_fresh_retry_budget(client, sessions, worker, rabbit, payfleet):
    event_id = event_letter(client, sessions, rabbit)
    attempts = "SELECT attempts FROM provider_events WHERE id = :id"
    assert scalar(sessions, attempts, id=event_id) == 3
    code, out = payfleet("dead-letters", "requeue", "--all")
    assert code == 0 and "requeued 1 message(s)" in out
    # The cause is not fixed: three more attempts, not one, then a dead letter again.
    eventually(lambda: scalar(sessions, attempts, id=event_id) == 6 and depth(rabbit, "payments") == 1)
    [letter] = dead_letters.list_dead(rabbit, ("payments",))
    assert (letter.args, letter.retries) == ((event_id,), 2)


def test_what_cannot_run_again_is_left_with_the_reason(client, sessions, worker, rabbit, payfleet):
    put_product(client, "GLOVE", on_hand=2)
    placed = checkout(client, ("GLOVE", 1)).json
    event_id = event_letter(client, sessions, rabbit)
    # The operator replayed the event meanwhile: it is applied, for good.
    adopt_intent(sessions, placed["order_id"], "pi_late")
    assert client.simulate_post(f"/admin/events/{event_id}/replay", headers=ADMIN).status_code == 202
    eventually(lambda: order(client, placed["order_id"])["status"] == "paid")
    junk = pika.BlockingConnection(rabbit)
    junk.channel().basic_publish("", "payments.XQ", b"not json", pika.BasicProperties(message_id="junk-1"))
    junk.close()

    code, out = payfleet("dead-letters", "requeue", "--all", "--queue", "payments")
    assert code == 0, out
    assert "requeued 0 message(s), left 2" in out
    assert f"event {event_id} is processed" in out
    assert "not a Dramatiq message" in out
    assert depth(rabbit, "payments") == 2


def test_a_requeue_rabbitmq_does_not_confirm_leaves_the_letter_in_place(
    client, sessions, worker, rabbit, payfleet, vhost
):
    event_letter(client, sessions, rabbit)
    # A full queue that refuses new messages: the publish is nacked.
    _rabbitmqctl(
        "set_policy", "-p", vhost, "--apply-to", "queues", "full-payments", "^payments$",
        '{"max-length": 0, "overflow": "reject-publish"}',
    )  # fmt: skip
    try:
        time.sleep(0.5)  # the policy reaches the queue
        code, out = payfleet("dead-letters", "requeue", "--all", "--queue", "payments")
    finally:
        _rabbitmqctl("clear_policy", "-p", vhost, "full-payments")
    assert code == 0, out
    assert "requeued 0 message(s), left 1" in out and "refused" in out
    assert depth(rabbit, "payments") == 1


def test_requeue_needs_all_or_ids_and_bad_arguments_are_refused(payfleet, rabbit, broker):
    assert payfleet("dead-letters", "requeue")[0] == 2
    assert payfleet("dead-letters", "requeue", "--all", "--id", "x")[0] == 2
    assert payfleet("dead-letters", "list", "--older-than", "soon")[0] == 2
    assert payfleet("dead-letters", "list", "--queue", "payment")[0] == 2
    assert payfleet("dead-letters", "list", "--limit", "0")[0] == 2
    assert payfleet("dead-letters", "requeue", "--all", "--rate", "fast")[0] == 2


# --- archive -----------------------------------------------------------------------


def test_archive_then_list_archived_then_requeue_from_the_archive(
    three_letters, payfleet, client, sessions, rabbit, fake_whatsapp
):
    code, out = payfleet("dead-letters", "archive", "--dry-run")
    assert code == 0 and "would archive 3 message(s)" in out
    assert scalar(sessions, "SELECT count(*) FROM dead_letter_archive") == 0
    assert depth(rabbit, "notifications") == 1

    code, out = payfleet("dead-letters", "archive")
    assert code == 0 and "archived 3 message(s)" in out
    assert {queue: depth(rabbit, queue) for queue in QUEUES} == {"payments": 0, "jobs": 0, "notifications": 0}
    archived = json_lines(payfleet("dead-letters", "list", "--archived", "--json")[1])
    assert sorted(letter["queue"] for letter in archived) == sorted(QUEUES)
    assert all(letter["archived_at"] and letter["error"] for letter in archived)
    assert "x-death" in scalar(sessions, "SELECT headers FROM dead_letter_archive WHERE queue = 'payments'")

    fake_whatsapp.heal()
    code, out = payfleet("dead-letters", "requeue", "--archived", "--all", "--queue", "notifications")
    assert code == 0 and "requeued 1 message(s)" in out
    eventually(lambda: review_status(sessions, three_letters["review"]) == "sent")
    assert scalar(sessions, "SELECT count(*) FROM dead_letter_archive") == 2

    refused = payfleet("dead-letters", "purge", "--archived")
    assert refused[0] == 2 and scalar(sessions, "SELECT count(*) FROM dead_letter_archive") == 2
    code, out = payfleet("dead-letters", "purge", "--archived", "--yes")
    assert code == 0 and "purged 2 archived message(s)" in out
    assert scalar(sessions, "SELECT count(*) FROM dead_letter_archive") == 0


def test_an_archive_interrupted_before_its_acks_is_finished_without_duplicates(
    client, sessions, worker, rabbit, payfleet
):
    event_letter(client, sessions, rabbit)
    # A first archive stored the letter, then died before acknowledging it.
    [letter] = dead_letters.list_dead(rabbit, ("payments",))
    with sessions.begin() as session:
        session.execute(
            text("INSERT INTO dead_letter_archive (message_id, queue, actor, body, headers, error) "
                 "VALUES (:id, 'payments', 'apply_event', :body, '{}', '')"),
            {"id": letter.message_id, "body": letter.body},
        )  # fmt: skip
    code, out = payfleet("dead-letters", "archive")
    assert code == 0 and "archived 1 message(s)" in out
    assert depth(rabbit, "payments") == 0
    assert scalar(sessions, "SELECT count(*) FROM dead_letter_archive") == 1


def test_the_archive_job_takes_only_letters_older_than_its_age(
    client, sessions, limited, worker, rabbit, fake_stripe
):
    old = event_letter(client, sessions, rabbit, "pi_old")
    time.sleep(3)
    young = event_letter(client, sessions, rabbit, "pi_young")
    eventually(lambda: depth(rabbit, "payments") == 2)
    settings = load_settings({**limited, "DEAD_LETTER_ARCHIVE_AFTER_SECONDS": "3"})
    with job_runner(sessions, settings) as runner:
        run = run_job(runner, sessions, "archive-dead-letters")
    assert run["state"] == "succeeded", run
    assert run["counts"] == {"archived_payments": 1}
    assert [letter.args for letter in dead_letters.list_dead(rabbit, ("payments",))] == [(young,)]
    [archived] = dead_letters.list_archived(sessions)
    assert archived.args == (old,) and "PaymentNotFound" in archived.error


# --- purge ---------------------------------------------------------------------------


def test_purge_needs_yes_and_says_how_many_it_removed(client, sessions, worker, rabbit, payfleet):
    event_letter(client, sessions, rabbit)
    code, _ = payfleet("dead-letters", "purge")
    assert code == 2
    assert depth(rabbit, "payments") == 1
    code, out = payfleet("dead-letters", "purge", "--yes")
    assert code == 0 and "purged 1 message(s)" in out
    assert depth(rabbit, "payments") == 0


def test_the_command_itself_runs_from_a_shell_with_progress_on_a_terminal(
    client, sessions, worker, rabbit, limited
):
    """As a process, as an operator's terminal or script runs it: progress
    goes to stderr when it is a terminal, never into the piped output."""
    event_letter(client, sessions, rabbit)
    listed = subprocess.run(
        [sys.executable, "-m", "payfleet.cli", "dead-letters", "list", "--queue", "payments"],
        env={**os.environ, **limited},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert "apply_event(" in listed.stdout
    terminal, attached = pty.openpty()
    shown: list[bytes] = []
    # Read while it runs: a terminal's buffer is small, a writer blocks on a full one.
    reader = threading.Thread(target=_drain, args=(terminal, shown), daemon=True)
    reader.start()
    try:
        requeued = subprocess.run(
            [sys.executable, "-m", "payfleet.cli", "dead-letters", "requeue", "--all"],
            env={**os.environ, **limited},
            stdout=subprocess.PIPE,
            stderr=attached,
            text=True,
            timeout=60,
        )
    finally:
        os.close(attached)
        reader.join(10)
        os.close(terminal)
    assert requeued.returncode == 0
    assert "requeued 1/1" in b"".join(shown).decode()
    assert "1/1" not in requeued.stdout and "requeued 1 message(s), left 0" in requeued.stdout


def _drain(terminal: int, into: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the other end closed
            return
        if not chunk:
            return
        into.append(chunk)
