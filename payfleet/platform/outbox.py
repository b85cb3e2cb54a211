"""Persist first, then publish: the row is the outbox.

A stored provider event and a manual job run are committed before anything
is published or answered, so a 2xx always means the row is in PostgreSQL.
A publish that fails or times out leaves the row unpublished; the
scheduler publishes it later."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from domain import job_runs
from domain.events import (
    EventFacts,
    mark_published,
    new_trace_id,
    record_event,
    record_events,
    reopen,
    reopen_many,
)
from domain.job_table import JobTable
from payfleet.platform.group_commit import GroupCommit
from payfleet.platform.publishing import Publisher, run_message

log = logging.getLogger(__name__)


class Outbound:
    """Publishes stored events in the background, right after their commit,
    and marks the confirmed ones published, many per UPDATE. The request
    that stored an event answers without waiting for RabbitMQ (its 2xx means
    committed, which is the promise): it pays neither a confirm round trip
    nor a second transaction. An event this never confirms (a broker outage,
    a process killed in between) keeps `published_at` empty and the relay
    publishes it after its grace period; a lost mark only means one more
    publish, which the worker treats as a duplicate."""

    # Messages per AMQP transaction.
    SLICE = 32
    # Two publishers, each on its own connection, so one transaction is
    # being written while the other waits for RabbitMQ's disk; each takes
    # what gathered in GATHER seconds. A thread stuck on a hung broker holds
    # up only itself until pika gives up (and publishing pauses); the relay
    # has the events meanwhile.
    THREADS = 2
    GATHER = 0.01
    MARK_EVERY = 0.05
    MARK_BATCH = 2000

    def __init__(self, sessions: sessionmaker[Session], publisher: Publisher) -> None:
        self._sessions = sessions
        self._publisher = publisher
        # (event id, trace id): the message carries the event's trace id.
        self._waiting: queue.SimpleQueue[tuple[int, str | None]] = queue.SimpleQueue()
        self._confirmed: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def add(self, event_id: int, trace_id: str | None = None) -> None:
        self._waiting.put((event_id, trace_id))
        with self._lock:
            # Started on first use: in a gunicorn worker, after the fork.
            if not self._threads:
                self._threads = [
                    threading.Thread(target=self._run, name=f"outbound-{n}", daemon=True)
                    for n in range(self.THREADS)
                ]
                self._threads.append(threading.Thread(target=self._mark, name="published-marks", daemon=True))
                for thread in self._threads:
                    thread.start()

    def _run(self) -> None:
        while True:
            first, trace_id = self._waiting.get()
            ids = {first: trace_id}
            # A moment for company: a transaction of many costs about what
            # one of one does, and nothing waits for this but the worker.
            time.sleep(self.GATHER)
            while len(ids) < self.SLICE:
                try:
                    event_id, trace_id = self._waiting.get_nowait()
                except queue.Empty:
                    break
                ids[event_id] = trace_id
            # Any error: this thread must live on, or every later event would
            # be left to the relay.
            try:
                confirmed = self._publisher.send_events(ids, background=True)
            except Exception as error:
                log.warning("publishing events %s failed (the relay will publish them): %s", list(ids), error)
                continue
            for event_id in confirmed:
                self._confirmed.put(event_id)

    def _mark(self) -> None:
        while True:
            ids = [self._confirmed.get()]
            # Marks wait a moment to share an UPDATE: one per MARK_EVERY
            # seconds at most, instead of one per webhook when they are few.
            time.sleep(self.MARK_EVERY)
            with contextlib.suppress(queue.Empty):
                while len(ids) < self.MARK_BATCH:
                    ids.append(self._confirmed.get_nowait())
            try:
                with self._sessions.begin() as session:
                    mark_published(session, ids)
            # Any error: this thread must live on, or every later event would
            # be published again by the relay.
            except Exception as error:
                log.warning(
                    "events %s published but not marked (the relay will publish them again): %s", ids, error
                )


# Events an operator's replay reopens in one transaction and publishes at once.
REPLAY_SLICE = 100
# Stores at once what request threads bring together: a handful of webhooks
# arriving side by side pay one INSERT and one commit.
STORE_BATCH_MAX = 64
# Stores that may commit side by side in one process: at two webhooks at a
# time a single one made the second wait for the first's commit (measured:
# half the bare endpoint's rate at 2 connections).
STORE_CONCURRENCY = 2


class EventInbox:
    def __init__(self, sessions: sessionmaker[Session], publisher: Publisher) -> None:
        self._sessions = sessions
        # Events are stored on a plain connection of the sessions' engine.
        self._engine: Engine = sessions.kw["bind"]
        self._publisher = publisher
        self._outbound = Outbound(sessions, publisher)
        self._stores = GroupCommit(
            self._store,
            max_size=STORE_BATCH_MAX,
            linger=0.0,
            name="event-inbox",
            concurrency=STORE_CONCURRENCY,
        )

    def accept(self, facts: EventFacts) -> tuple[int, bool]:
        """Store an event (committed when this returns) and have it published;
        returns its row id and whether it was a duplicate. The webhook's
        access line says which (ingress/webhooks.py): a line of its own per
        webhook was 6 % of the ingress's time at 16 connections."""
        try:
            event_id, duplicate = self._stores.call(facts)
        except Exception:
            # One bad event fails its whole batch: each is stored alone, so
            # the error is its own (and answered as such), the others stored.
            with self._engine.begin() as connection:
                event_id, duplicate = record_event(connection, facts)
        if not duplicate:
            self._outbound.add(event_id, facts.trace_id)
        return event_id, duplicate

    def _store(self, batch: Sequence[EventFacts]) -> list[tuple[int, bool]]:
        with self._engine.begin() as connection:
            return record_events(connection, batch)

    def replay(self, event_id: int) -> bool:
        """Reopen an unmatched, failed or ignored event and publish it again;
        returns whether RabbitMQ confirmed (if not, the relay will)."""
        with self._sessions.begin() as session:
            trace_id = reopen(session, event_id).trace_id
        if not self._publisher.send_events({event_id: trace_id}):
            return False
        # An operator's replay marks at once: the command may exit next.
        with self._sessions.begin() as session:
            mark_published(session, [event_id])
        return True

    def replay_many(
        self,
        event_ids: Sequence[int],
        *,
        slice_size: int = REPLAY_SLICE,
        pace: Callable[[], None] = lambda: None,
        progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> tuple[list[int], list[int]]:
        """replay for many events, a slice at a time: reopened in one
        transaction, then published and marked. Returns (reopened,
        published); one reopened but not published is left to the relay,
        and one settled for good meanwhile (processed) is left out."""
        ids, reopened, published = list(event_ids), [], []
        for start in range(0, len(ids), slice_size):
            with self._sessions.begin() as session:
                opened = reopen_many(session, ids[start : start + slice_size])
            pace()
            sent = self._publisher.send_events(opened) if opened else []
            if sent:
                with self._sessions.begin() as session:
                    mark_published(session, sent)
            reopened += list(opened)
            published += sent
            progress(min(start + slice_size, len(ids)), len(ids))
        return reopened, published


def start_manual_run(
    sessions: sessionmaker[Session], publisher: Publisher, table: JobTable, name: str
) -> tuple[int, bool]:
    """Record a manual run and publish it; returns (run id, published). An
    unpublished run is published by the scheduler's next tick."""
    job = table.get(name)
    if job is None:
        raise KeyError(name)
    trace_id = new_trace_id()
    with sessions.begin() as session:
        run_id = job_runs.create_manual(session, job.name, trace_id=trace_id)
    published = bool(publisher.send([(run_id, run_message(job.actor, run_id, trace_id))]))
    if published:
        with sessions.begin() as session:
            job_runs.mark_published(session, [run_id])
    return run_id, published
