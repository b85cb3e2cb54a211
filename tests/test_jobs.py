"""The other jobs, the run records and starting a run by hand, against the
real PostgreSQL and RabbitMQ, with a fake WhatsApp API on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
import pika
import pytest
from sqlalchemy import text

import workers.job_runner
from domain import job_runs
from domain.job_runs import StartedRun
from domain.messaging import MessagingError, WhatsAppApiGateway, WhatsAppGateway
from domain.models import Cart
from payfleet.platform.broker import build_broker
from payfleet.platform.config import load_settings
from payfleet.platform.publishing import review_request_message, run_message
from tests.conftest import eventually, scalar
from tests.support.jobs import completed_order, job_runner, make_stale, order_status, run_job, stripe_order
from tests.support.shop import ADMIN, product, put_product
from workers.job_runner import JobContext, declare_job_actors, job_gateways


def requests_by_status(sessions: Any) -> dict[str, int]:
    with sessions() as session:
        return dict(
            session.execute(text("SELECT status, count(*) FROM review_requests GROUP BY status")).all()
        )


def test_reviews_are_requested_once_per_order_whatever_runs_and_redeliveries(
    sessions, settings, worker, fake_whatsapp
):
    asked = [completed_order(sessions, 7.5), completed_order(sessions, 7.9, phone="+33622222222")]
    completed_order(sessions, 7.2, phone=None)  # no phone: skipped and counted
    completed_order(sessions, 3)  # too recent
    completed_order(sessions, 15)  # older than the two weeks a late request may still go out
    with job_runner(sessions, settings) as runner:
        first = run_job(runner, sessions, "request-reviews")
        second = run_job(runner, sessions, "request-reviews")
    assert first["counts"] == {"requested": 2, "skipped_no_phone": 1, "published": 2, "republished": 0}
    assert second["counts"].get("requested", 0) == 0
    eventually(lambda: requests_by_status(sessions) == {"sent": 2, "skipped": 1})
    # The same messages delivered again: nothing more is sent.
    broker = build_broker(settings)
    for request_id in scalar_ids(sessions):
        broker.enqueue(review_request_message(request_id))
        broker.enqueue(review_request_message(request_id))
    broker.close()
    settle(worker, "notifications")  # every delivery processed, retries included
    sent = fake_whatsapp.messages
    assert len(sent) == 2
    assert sorted(m.to for m in sent) == ["whatsapp:+33611111111", "whatsapp:+33622222222"]
    assert all(m.sender == "whatsapp:" + settings.whatsapp_from and "review" in m.body for m in sent)
    assert scalar(sessions, "SELECT count(DISTINCT order_id) FROM review_requests") == 3
    assert {str(o) for o in asked} == {
        str(o) for o in scalar_list(sessions, "SELECT order_id FROM review_requests WHERE status = 'sent'")
    }


def scalar_ids(sessions: Any) -> list[int]:
    return [int(i) for i in scalar_list(sessions, "SELECT id FROM review_requests WHERE status <> 'skipped'")]


def scalar_list(sessions: Any, sql: str) -> list[Any]:
    with sessions() as session:
        return list(session.execute(text(sql)).scalars())


def test_a_failing_whatsapp_api_is_retried_then_the_request_is_marked_failed(
    sessions, settings, worker, fake_whatsapp
):
    fake_whatsapp.fail_all(503)
    completed_order(sessions, 7.5)
    with job_runner(sessions, settings) as runner:
        run_job(runner, sessions, "request-reviews")
    eventually(lambda: requests_by_status(sessions) == {"failed": 1}, timeout=20)
    assert fake_whatsapp.attempts == settings.notification_max_attempts == 3
    assert scalar(sessions, "SELECT attempts FROM review_requests") == 3
    assert "503" in scalar(sessions, "SELECT last_error FROM review_requests")
    assert fake_whatsapp.messages == []


def test_a_refused_number_fails_at_once(sessions, settings, worker, fake_whatsapp):
    fake_whatsapp.fail_all(400)
    completed_order(sessions, 7.5)
    with job_runner(sessions, settings) as runner:
        run_job(runner, sessions, "request-reviews")
    eventually(lambda: requests_by_status(sessions) == {"failed": 1})
    assert fake_whatsapp.attempts == 1


def test_expired_carts_are_deleted_in_batches(sessions, settings):
    now = datetime.now(UTC)
    with sessions() as session:
        session.add_all(Cart(expires_at=now - timedelta(minutes=1 + n)) for n in range(1203))
        session.add_all(Cart(expires_at=now + timedelta(hours=1)) for _ in range(3))
        session.commit()
    with job_runner(sessions, settings) as runner:
        run = run_job(runner, sessions, "clean-expired-carts")
    assert run["state"] == "succeeded" and run["counts"] == {"carts_deleted": 1203}
    assert scalar(sessions, "SELECT count(*) FROM carts") == 3


def test_old_reservations_of_unpaid_orders_are_released(client, sessions, settings, fake_stripe):
    put_product(client, "RES", 10)
    old, _ = stripe_order(client, "RES", 2)
    stripe_order(client, "RES", 3)  # young: its reservation stays
    make_stale(sessions, old, age="31 minutes")
    with job_runner(sessions, settings) as runner:
        run = run_job(runner, sessions, "release-expired-reservations")
        again = run_job(runner, sessions, "release-expired-reservations")
    assert run["counts"] == {"orders_released": 1, "units_released": 2}
    assert again["counts"] == {}
    assert product(client, "RES")["reserved"] == 3
    assert order_status(sessions, old) == ("pending_payment", "pending")


def test_two_runs_of_one_job_never_overlap_and_a_finished_run_is_not_run_again(sessions, settings, engine):
    with sessions() as session:
        first, second = (
            job_runs.create_manual(session, "clean-expired-carts"),
            job_runs.create_manual(session, "clean-expired-carts"),
        )
        session.commit()
    with job_runner(sessions, settings) as runner, engine.connect() as holder:
        # Another worker is running the job: it holds the job's lock.
        holder.execute(
            text("SELECT pg_advisory_lock(hashtext('payfleet-job'), hashtext('clean-expired-carts'))")
        )
        assert runner.execute(first) == "skipped"
        holder.execute(text("SELECT pg_advisory_unlock_all()"))
        assert runner.execute(second) == "succeeded"
        assert runner.execute(second) == "succeeded"  # redelivered: nothing happens
    with sessions() as session:
        skipped, done = job_runs.get(session, first), job_runs.get(session, second)
    assert skipped and skipped["state"] == "skipped" and "in progress" in skipped["error"]
    assert done and done["attempts"] == 1 and done["duration_seconds"] is not None


def test_a_manual_run_through_the_admin_api(client, sessions, worker):
    with sessions() as session:
        session.add(Cart(expires_at=datetime.now(UTC) - timedelta(days=1)))
        session.commit()
    assert client.simulate_post("/admin/jobs/clean-expired-carts/run").status_code == 401
    assert client.simulate_post("/admin/jobs/no-such-job/run", headers=ADMIN).status_code == 404
    answer = client.simulate_post("/admin/jobs/clean-expired-carts/run", headers=ADMIN)
    assert answer.status_code == 202 and answer.json["published"] is True
    run_id = answer.json["run_id"]

    def finished() -> Any:
        found = client.simulate_get(
            "/admin/jobs/runs", params={"job": "clean-expired-carts"}, headers=ADMIN
        ).json
        return [r for r in found["runs"] if r["id"] == run_id and r["state"] == "succeeded"]

    [run] = eventually(finished)
    assert run["trigger"] == "manual" and run["counts"] == {"carts_deleted": 1}
    jobs = client.simulate_get("/admin/jobs", headers=ADMIN).json["jobs"]
    assert [j["name"] for j in jobs] == [
        "expire-stale-orders",
        "cleanup-stale-payment-intents",
        "clean-expired-carts",
        "request-reviews",
        "release-expired-reservations",
        "archive-dead-letters",
    ]
    carts = jobs[2]
    assert carts["cron"] == "0 * * * *" and carts["time_zone"] == "Europe/Paris"
    assert carts["last_run"]["id"] == run_id
    next_utc = datetime.fromisoformat(carts["next_run"]["utc"])
    assert next_utc.minute == 0 and next_utc > datetime.now(UTC)
    assert datetime.fromisoformat(carts["next_run"]["local"]) == next_utc
    metrics = client.simulate_get("/admin/jobs/metrics", headers=ADMIN).json
    assert metrics["paymentsExpiredTotal"] == 0
    assert metrics["jobExecutionTime"]["clean-expired-carts"] >= 0
    assert "clean-expired-carts" in metrics["lastExecutionTime"]
    assert client.simulate_get("/admin/jobs/runs", params={"job": "nope"}, headers=ADMIN).status_code == 400


def test_metrics_are_summed_from_the_run_records(client, sessions, settings, fake_stripe):
    put_product(client, "MET", 10)
    orders = [stripe_order(client, "MET", 2)[0] for _ in range(3)]
    make_stale(sessions, *orders)
    with job_runner(sessions, settings) as runner:
        run_job(runner, sessions, "expire-stale-orders")
    metrics = client.simulate_get("/admin/jobs/metrics", headers=ADMIN).json
    assert metrics["paymentsExpiredTotal"] == 3
    assert metrics["paymentIntentsCanceledTotal"] == 3
    assert metrics["stockReleasedTotal"] == 6


def test_payfleet_jobs_run_wait_from_the_command_line(env, sessions, worker):
    with sessions() as session:
        session.add_all([Cart(expires_at=datetime.now(UTC) - timedelta(days=1)) for _ in range(2)])
        session.commit()

    def payfleet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "payfleet.cli", *args],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = payfleet("jobs", "run", "clean-expired-carts", "--wait", "--timeout", "30")
    assert done.returncode == 0, done.stdout + done.stderr
    run = json.loads(done.stdout[done.stdout.index("{") :])
    assert run["state"] == "succeeded" and run["counts"] == {"carts_deleted": 2}
    listed = json.loads(payfleet("jobs", "list").stdout)
    assert len(listed) == 6 and listed[2]["last_run"]["id"] == run["id"]
    history = json.loads(payfleet("jobs", "runs", "--job", "clean-expired-carts").stdout)
    assert [r["id"] for r in history] == [run["id"]]
    assert payfleet("jobs", "run", "no-such-job").returncode == 2


def test_a_run_delivered_twice_at_once_runs_exactly_once(sessions, settings):
    """Two worker threads get the same run message at the same moment, many
    times over: each run executes once and ends succeeded, never skipped."""
    with job_runner(sessions, settings) as runner:
        for _ in range(15):
            with sessions() as session:
                session.add(Cart(expires_at=datetime.now(UTC) - timedelta(minutes=1)))
                run_id = job_runs.create_manual(session, "clean-expired-carts")
                session.commit()
            start = threading.Barrier(2)

            def deliver(run: int = run_id, barrier: threading.Barrier = start) -> None:
                barrier.wait()
                runner.execute(run)

            threads = [threading.Thread(target=deliver) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            with sessions() as session:
                run = job_runs.get(session, run_id)
            assert run is not None
            assert (run["state"], run["attempts"], run["counts"]) == (
                "succeeded",
                1,
                {"carts_deleted": 1},
            ), run
    assert scalar(sessions, "SELECT count(*) FROM carts") == 0


def dead_letters(broker_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def test_a_run_past_its_time_limit_is_recorded_failed_and_not_retried(
    env, sessions, broker_url, monkeypatch: pytest.MonkeyPatch
):
    def endless(c: JobContext, run: StartedRun, counts: Any) -> None:
        counts["started"] += 1
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:  # short sleeps: the time limit interrupts between them
            time.sleep(0.02)

    monkeypatch.setitem(workers.job_runner.WORK, "clean-expired-carts", endless)
    limited = load_settings({**env, "JOB_TIME_LIMIT_SECONDS": "0.5"})
    broker = build_broker(limited)
    declare_job_actors(broker, sessions, limited, job_gateways(limited))
    broker.emit_after("process_boot")  # as the dramatiq CLI does: starts TimeLimit's watchdog
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        with sessions() as session:
            run_id = job_runs.create_manual(session, "clean-expired-carts")
            session.commit()
        broker.enqueue(run_message("clean_expired_carts", run_id))

        def finished() -> dict[str, Any] | None:
            with sessions() as session:
                run = job_runs.get(session, run_id)
            return run if run and run["state"] != "running" and run["finished_at"] else None

        run = eventually(finished, timeout=20)
        # Not retried: the message is dead-lettered at once, not delayed for another attempt.
        eventually(lambda: dead_letters(broker_url, "jobs.XQ") == 1, timeout=10)
    finally:
        worker.stop()
        broker.close()
    with sessions() as session:
        again = job_runs.get(session, run_id)
    assert run["state"] == "failed" and "TimeLimitExceeded" in run["error"], run
    assert run["counts"] == {"started": 1}
    assert again is not None and again == run and again["attempts"] == 1


class CrashAfterSending:
    """The WhatsApp API accepts the message, then the worker dies before it
    can record that (here: the first send raises after the API answered)."""

    def __init__(self, gateway: WhatsAppGateway) -> None:
        self._gateway, self.crashed = gateway, False

    def send(self, *, to: str, body: str) -> str:
        sid = self._gateway.send(to=to, body=body)
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("worker lost before recording the send")
        return sid


def settle(worker: dramatiq.Worker, queue: str) -> None:
    """Wait until nothing is queued, delayed or being worked on."""
    for _ in range(2):
        worker.broker.join(queue, timeout=20_000)
        worker.join()


def test_a_send_whose_outcome_was_never_recorded_is_not_sent_again(sessions, settings, fake_whatsapp):
    gateways = job_gateways(settings)
    crashing = CrashAfterSending(gateways.whatsapp)
    broker = build_broker(settings)
    declare_job_actors(broker, sessions, settings, replace(gateways, whatsapp=crashing))
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        completed_order(sessions, 7.5)
        with job_runner(sessions, settings) as runner:
            run_job(runner, sessions, "request-reviews")
        eventually(lambda: crashing.crashed)
        settle(worker, "notifications")  # the failed delivery's retries included
        assert len(fake_whatsapp.messages) == 1
        assert requests_by_status(sessions) == {"sending": 1}
        # Long after: a new delivery finds the claim stale and gives up rather than resend.
        with sessions() as session:
            session.execute(text("UPDATE review_requests SET claimed_at = now() - interval '1 hour'"))
            session.commit()
        [request_id] = scalar_ids(sessions)
        broker.enqueue(review_request_message(request_id))
        settle(worker, "notifications")
    finally:
        worker.stop()
        broker.close()
    assert len(fake_whatsapp.messages) == 1
    assert requests_by_status(sessions) == {"failed": 1}
    assert "outcome unknown" in scalar(sessions, "SELECT last_error FROM review_requests")


def test_a_read_timeout_is_ambiguous_and_a_refused_connection_retryable():
    with socket.socket() as silent, socket.socket() as closed:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts connections (backlog), never answers
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused

        def send(server: socket.socket) -> MessagingError:
            port = server.getsockname()[1]
            gateway = WhatsAppApiGateway(f"http://127.0.0.1:{port}", "AC1", "token", "+1", timeout=0.3)
            with pytest.raises(MessagingError) as failure:
                gateway.send(to="+33611111111", body="hello")
            return failure.value

        timed_out, refused = send(silent), send(closed)
    assert (timed_out.retryable, timed_out.ambiguous) == (False, True)
    assert (refused.retryable, refused.ambiguous) == (True, False)


def scheduled_review_run(runner: Any, sessions: Any, slot: datetime) -> None:
    with sessions() as session:
        run_id = job_runs.claim(session, "request-reviews", slot, "queued")
        session.commit()
    assert run_id is not None and runner.execute(run_id) == "succeeded"


def asked(sessions: Any, order_id: uuid.UUID) -> bool:
    return bool(scalar(sessions, "SELECT count(*) FROM review_requests WHERE order_id = :id", id=order_id))


def completed_at(sessions: Any, when: datetime) -> uuid.UUID:
    order_id = completed_order(sessions, 0)
    with sessions() as session:
        session.execute(
            text("UPDATE orders SET completed_at = :at WHERE id = :id"), {"at": when, "id": order_id}
        )
        session.commit()
    return order_id


def test_every_completed_order_is_asked_across_the_autumn_change_and_a_missed_day(sessions, settings):
    # Daily 10:00 Paris: 08:00 UTC on Saturday 2026-10-24, 09:00 UTC on the
    # Sunday the clocks go back. An order completed at 10:30 Paris a week
    # before that Saturday fell between the two runs' week-old days.
    between = completed_at(sessions, datetime(2026, 10, 17, 8, 30, tzinfo=UTC))
    # A run skipped (scheduler down) on Wednesday 2026-06-10: Thursday's run
    # still asks the orders Wednesday's would have.
    missed_day = completed_at(sessions, datetime(2026, 6, 3, 7, 0, tzinfo=UTC))
    too_recent = completed_at(sessions, datetime(2026, 6, 4, 8, 30, tzinfo=UTC))
    with job_runner(sessions, settings) as runner:
        scheduled_review_run(runner, sessions, datetime(2026, 6, 11, 8, 0, tzinfo=UTC))
        assert asked(sessions, missed_day) and not asked(sessions, too_recent)
        scheduled_review_run(runner, sessions, datetime(2026, 10, 24, 8, 0, tzinfo=UTC))
        assert not asked(sessions, between)  # a week old on Sunday, not yet on Saturday
        scheduled_review_run(runner, sessions, datetime(2026, 10, 25, 9, 0, tzinfo=UTC))
    assert asked(sessions, between)
    assert not asked(sessions, too_recent)  # its week is up on the next day's run
    assert scalar(sessions, "SELECT count(*) FROM review_requests") == 2
