"""Slot claiming against the real PostgreSQL and RabbitMQ: one run per slot
whatever the number of replicas, coalesced catch-up after an outage, and a
claim whose publish never happened published later."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pytest
from sqlalchemy import text

from bench.procs import stop_groups
from payfleet.platform.broker import build_broker
from payfleet.platform.config import job_table, load_settings
from payfleet.platform.publishing import Publisher
from schedules.claims import SlotClaimer
from tests.conftest import eventually, scalar


class RecordingSender(Publisher):
    """Confirms everything and remembers what it was asked to publish."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[int] = []
        self.fail = fail
        self._lock = threading.Lock()

    def send(self, messages):
        if self.fail:
            return []
        with self._lock:
            self.sent += [key for key, _ in messages]
        return [key for key, _ in messages]


def claimer(sessions: Any, settings: Any, sender: Any = None, **kwargs: Any) -> SlotClaimer:
    kwargs.setdefault("republish_after", 0.5)
    return SlotClaimer(sessions, job_table(settings), sender or RecordingSender(), **kwargs)


def rows(sessions: Any, job: str | None = None) -> list[Any]:
    with sessions() as session:
        query = "SELECT job, slot, state, published_at IS NOT NULL FROM scheduled_runs"
        if job:
            query += " WHERE job = :job"
        return list(session.execute(text(query + " ORDER BY slot"), {"job": job}).all())


def every(start: datetime, minutes: int, hours: int = 12) -> list[datetime]:
    """Slots `minutes` apart in real time (UTC), from `start` for `hours`:
    what an interval job must fire, computed without cron or time zones."""
    return [start + timedelta(minutes=minutes * n) for n in range(hours * 60 // minutes + 1)]


def utc(year: int, month: int, day: int, hour: int) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


# Midnight Paris before each change, and each job's slots written out by hand
# from there to 12 real hours later (the latest slot before midnight first).
EXPECTED = {
    utc(2026, 3, 28, 22): {
        "expire-stale-orders": every(utc(2026, 3, 28, 22), 5),
        "release-expired-reservations": every(utc(2026, 3, 28, 22), 15),
        "clean-expired-carts": every(utc(2026, 3, 28, 22), 60),
        # 10:00 Paris: +01:00 on Saturday, +02:00 on Sunday.
        "request-reviews": [utc(2026, 3, 28, 9), utc(2026, 3, 29, 8)],
        # Sunday 03:00 Paris: the week before (+01:00), then just after the gap (+02:00).
        "cleanup-stale-payment-intents": [utc(2026, 3, 22, 2), utc(2026, 3, 29, 1)],
    },
    utc(2026, 10, 24, 21): {
        "expire-stale-orders": every(utc(2026, 10, 24, 21), 5),
        "release-expired-reservations": every(utc(2026, 10, 24, 21), 15),
        "clean-expired-carts": every(utc(2026, 10, 24, 21), 60),
        "request-reviews": [utc(2026, 10, 24, 8), utc(2026, 10, 25, 9)],
        "cleanup-stale-payment-intents": [utc(2026, 10, 18, 1), utc(2026, 10, 25, 2)],
    },
}


def test_ticking_through_both_dst_days_records_every_slot_once(sessions, settings):
    """A clock ticking every 4 minutes through the first 12 hours of
    2026-03-29 and 2026-10-25 in Europe/Paris (the change, the Sunday sweep
    and the 10:00 reviews): each job's recorded slots are exactly its
    schedule, none skipped, none doubled."""
    sender = RecordingSender()
    for day in (datetime(2026, 3, 28, 22, tzinfo=UTC), datetime(2026, 10, 24, 21, tzinfo=UTC)):
        with sessions() as session:  # each day from a fresh start
            session.execute(text("DELETE FROM scheduled_runs"))
            session.commit()
        ticker = claimer(sessions, settings, sender)
        ticker.run_once(now=day)  # the first tick claims the latest slot before the day
        now = day
        while now < day + timedelta(hours=12):
            now += timedelta(seconds=240)
            ticker.run_once(now=now)
        for name, slots in EXPECTED[day].items():
            assert [slot for _, slot, _, _ in rows(sessions, name)] == slots, name
        # Only the daily and weekly slots found at the first tick were too old to catch up.
        late = "SELECT count(*) FROM scheduled_runs WHERE state <> 'queued' AND slot >= :day"
        assert scalar(sessions, late, day=day) == 0
        # 12 real hours of 5-minute slots, plus the one before.
        assert len(rows(sessions, "expire-stale-orders")) == 12 * 12 + 1
    assert Counter(sender.sent).most_common(1)[0][1] == 1


def test_replicas_racing_for_the_same_slot_claim_it_once(sessions, settings):
    senders = [RecordingSender() for _ in range(6)]
    # A republish grace far beyond this test: a claimer slowed by the race
    # must not see its own fresh claim republished by another replica (that
    # duplicate is harmless, the run executes once, but it is not this test).
    tickers = [claimer(sessions, settings, sender, republish_after=60) for sender in senders]
    now = datetime(2026, 6, 7, 10, 0, 1, tzinfo=UTC)
    start = threading.Barrier(len(tickers))

    def tick(ticker):
        start.wait()
        ticker.run_once(now=now)

    threads = [threading.Thread(target=tick, args=(t,)) for t in tickers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    published = [run for sender in senders for run in sender.sent]
    assert len(published) == len(set(published)) == scalar(sessions, "SELECT count(*) FROM scheduled_runs")
    assert len(published) == 6  # one per job


def test_a_scheduler_down_two_hours_runs_each_job_once_on_recovery(sessions, settings):
    sender = RecordingSender()
    ticker = claimer(sessions, settings, sender)
    down = datetime(2026, 6, 6, 6, 58, tzinfo=UTC)  # Saturday 08:58 Paris
    ticker.run_once(now=down)
    before = len(sender.sent)
    ticker.run_once(now=down + timedelta(hours=2))  # 10:58 Paris: every job but the weekly one is due
    recovered = sender.sent[before:]
    with sessions() as session:
        by_job = dict(
            session.execute(
                text("SELECT job, count(*) FROM scheduled_runs WHERE id = ANY(:ids) GROUP BY job"),
                {"ids": recovered},
            ).all()
        )
        skipped = dict(
            session.execute(
                text(
                    "SELECT job, count(*) FROM scheduled_runs "
                    "WHERE state = 'skipped' AND slot > :down GROUP BY job"
                ),
                {"down": down},
            ).all()
        )
    assert by_job == {
        "expire-stale-orders": 1,
        "release-expired-reservations": 1,
        "clean-expired-carts": 1,
        "request-reviews": 1,
        "archive-dead-letters": 1,
    }
    # 24 five-minute slots in two hours: one ran, 23 are recorded as skipped.
    assert skipped == {
        "expire-stale-orders": 23,
        "release-expired-reservations": 7,
        "clean-expired-carts": 1,
        "archive-dead-letters": 1,
    }


def test_a_slot_found_past_its_catch_up_window_is_recorded_as_skipped(sessions, settings):
    sender = RecordingSender()
    ticker = claimer(sessions, settings, sender)
    # Monday 09:00 Paris: Sunday 03:00's sweep is 30 hours old (window 1 day),
    # Sunday 10:00's reviews 23 hours (window 12 hours); the others are fresh.
    ticker.run_once(now=datetime(2026, 6, 8, 7, 0, 30, tzinfo=UTC))
    sweep = rows(sessions, "cleanup-stale-payment-intents")
    assert [(state, published) for _, _, state, published in sweep] == [("skipped", False)]
    reviews = rows(sessions, "request-reviews")
    assert [(state, published) for _, _, state, published in reviews] == [("skipped", False)]
    assert len(sender.sent) == 4


def test_a_claim_whose_publish_failed_is_published_by_the_next_tick(sessions, settings):
    now = datetime(2026, 6, 7, 10, 0, 1, tzinfo=UTC)
    claimer(sessions, settings, RecordingSender(fail=True)).run_once(now=now)
    assert scalar(sessions, "SELECT count(*) FROM scheduled_runs WHERE published_at IS NULL") == 6
    sender = RecordingSender()
    later = claimer(sessions, settings, sender)
    time.sleep(0.6)  # past the republish grace
    later.run_once(now=now)
    assert sorted(sender.sent) == [1, 2, 3, 4, 5, 6]
    assert scalar(sessions, "SELECT count(*) FROM scheduled_runs WHERE published_at IS NULL") == 0
    assert later.run_once(now=now) == []


def test_a_run_left_running_past_its_time_limit_is_recorded_failed(sessions, settings):
    with sessions() as session:
        session.execute(
            text(
                "INSERT INTO scheduled_runs (job, trigger, state, counts, attempts, started_at) VALUES "
                "('clean-expired-carts', 'manual', 'running', '{}', 1, now() - interval '2 hours'), "
                "('expire-stale-orders', 'manual', 'running', '{}', 1, now() - interval '1 minute')"
            )
        )
        session.commit()
    claimer(sessions, settings, abandon_after=settings.job_time_limit_seconds + 300).run_once()
    with sessions() as session:
        found = session.execute(
            text("SELECT job, state, error, finished_at IS NOT NULL FROM scheduled_runs ORDER BY id")
        ).all()
    assert [(job, state, done) for job, state, _, done in found[:2]] == [
        ("clean-expired-carts", "failed", True),
        ("expire-stale-orders", "running", False),
    ]
    assert found[0][2].startswith("abandoned")
    # The server also drops the session of a worker whose host vanished, freeing its job lock.
    assert scalar(sessions, "SHOW tcp_keepalives_idle") == "30"


def test_claims_made_while_rabbitmq_was_down_publish_one_run_per_job(sessions, settings):
    down = claimer(sessions, settings, RecordingSender(fail=True))
    start = datetime(2026, 6, 6, 6, 58, tzinfo=UTC)  # Saturday 08:58 Paris, through the 10:00 reviews
    now = start
    while now < start + timedelta(hours=2):
        down.run_once(now=now)
        now += timedelta(seconds=240)
    assert scalar(sessions, "SELECT count(*) FROM scheduled_runs WHERE published_at IS NULL") > 30
    time.sleep(0.6)  # past the republish grace
    sender = RecordingSender()
    claimer(sessions, settings, sender).run_once(now=now)
    with sessions() as session:
        published = dict(
            session.execute(
                text("SELECT job, count(*) FROM scheduled_runs WHERE id = ANY(:ids) GROUP BY job"),
                {"ids": sender.sent},
            ).all()
        )
        newest = session.execute(
            text("SELECT job, max(slot) FROM scheduled_runs WHERE state = 'queued' GROUP BY job ORDER BY job")
        ).all()
        superseded = scalar(
            sessions, "SELECT count(*) FROM scheduled_runs WHERE error LIKE 'superseded by a later slot%'"
        )
    assert published == {
        "expire-stale-orders": 1,
        "release-expired-reservations": 1,
        "clean-expired-carts": 1,
        "request-reviews": 1,
        "archive-dead-letters": 1,
    }
    assert len(sender.sent) == 5 and len(newest) == 5  # only the newest slot of each job is still queued
    assert (
        scalar(
            sessions, "SELECT count(*) FROM scheduled_runs WHERE state = 'queued' AND published_at IS NULL"
        )
        == 0
    )
    assert superseded > 25


def _drain_jobs_queue(broker_url: str) -> list[Any]:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    bodies = []
    while True:
        method, _, body = channel.basic_get("jobs", auto_ack=True)
        if method is None:
            break
        bodies.append(json.loads(body))
    connection.close()
    return bodies


@pytest.mark.e2e
def test_two_scheduler_processes_enqueue_every_slot_exactly_once(env, sessions, broker_url):
    schedule = {"JOB_SCHEDULES": "expire-stale-orders=* * * * * */1", "OUTBOX_RELAY_INTERVAL_SECONDS": "0.1"}
    broker = build_broker(load_settings(env))
    broker.declare_queue("jobs", ensure=True)
    broker.close()
    schedulers = [
        subprocess.Popen(
            [sys.executable, "-m", "payfleet.cli", "scheduler"],
            env={**os.environ, **env, **schedule},
            start_new_session=True,
        )
        for _ in range(2)
    ]
    try:
        eventually(
            lambda: (
                scalar(sessions, "SELECT count(*) FROM scheduled_runs WHERE job = 'expire-stale-orders'") >= 8
            ),
            timeout=30,
        )
    finally:
        stop_groups(schedulers, 20)
    with sessions() as session:
        runs = session.execute(
            text(
                "SELECT id, slot, state, published_at IS NOT NULL FROM scheduled_runs "
                "WHERE job = 'expire-stale-orders' ORDER BY slot"
            )
        ).all()
    slots = [slot for _, slot, _, _ in runs]
    # No slot lost between the first and the last...
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(slots)] == [1.0] * (len(slots) - 1)
    queued = {run_id for run_id, _, state, published in runs if state == "queued"}
    assert all(published for _, _, state, published in runs if state == "queued")
    assert len(queued) >= 6
    # ...and each queued slot's message is in the queue exactly once.
    messages = Counter(
        body["args"][0]
        for body in _drain_jobs_queue(broker_url)
        if body["actor_name"] == "expire_stale_orders"
    )
    assert set(messages) == queued
    assert set(messages.values()) == {1}
