"""Persist first, then publish: the row is the outbox.

A stored provider event and a manual job run are committed before anything
is published or answered, so a 2xx always means the row is in PostgreSQL.
A publish that fails or times out leaves the row unpublished; the
scheduler publishes it later."""

from __future__ import annotations

import logging
import queue
import threading

from sqlalchemy.orm import Session, sessionmaker

from domain import job_runs
from domain.events import EventFacts, mark_published, record_event, reopen
from domain.job_table import JobTable
from payfleet.platform.publishing import Publisher, run_message

log = logging.getLogger(__name__)


class PublishedMarks:
    """Marks published events in the background, many per UPDATE, so the
    request that published them does not pay a second transaction. Marks
    wait in memory for milliseconds; one lost with its process, or with
    PostgreSQL, only means the relay publishes the event once more, which
    the worker treats as a duplicate."""

    BATCH = 500

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._waiting: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, event_id: int) -> None:
        self._waiting.put(event_id)
        with self._lock:
            # Started on first use: in a gunicorn worker, after the fork.
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="published-marks", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            ids = [self._waiting.get()]
            # Whatever came in while the last UPDATE ran goes into this one.
            while len(ids) < self.BATCH:
                try:
                    ids.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            try:
                with self._sessions.begin() as session:
                    mark_published(session, ids)
            # Any error: this thread must live on, or every later event would
            # be left to the relay.
            except Exception as error:
                log.warning(
                    "events %s published but not marked (the relay will publish them again): %s", ids, error
                )


class EventInbox:
    def __init__(self, sessions: sessionmaker[Session], publisher: Publisher) -> None:
        self._sessions = sessions
        self._publisher = publisher
        self._marks = PublishedMarks(sessions)

    def accept(self, facts: EventFacts) -> bool:
        """Store and publish one event; returns whether it was a duplicate."""
        with self._sessions.begin() as session:
            event_id, duplicate = record_event(session, facts)
        if not duplicate:
            self._publish(event_id)
        return duplicate

    def replay(self, event_id: int) -> bool:
        """Reopen an unmatched, failed or ignored event and publish it again;
        returns whether RabbitMQ confirmed (if not, the relay will)."""
        with self._sessions.begin() as session:
            reopen(session, event_id)
        if not self._publisher.send_events([event_id]):
            return False
        # An operator's replay marks at once: the command may exit next.
        with self._sessions.begin() as session:
            mark_published(session, [event_id])
        return True

    def _publish(self, event_id: int) -> None:
        if self._publisher.send_events([event_id]):
            self._marks.add(event_id)


def start_manual_run(
    sessions: sessionmaker[Session], publisher: Publisher, table: JobTable, name: str
) -> tuple[int, bool]:
    """Record a manual run and publish it; returns (run id, published). An
    unpublished run is published by the scheduler's next tick."""
    job = table.get(name)
    if job is None:
        raise KeyError(name)
    with sessions.begin() as session:
        run_id = job_runs.create_manual(session, job.name)
    published = bool(publisher.send([(run_id, run_message(job.actor, run_id))]))
    if published:
        with sessions.begin() as session:
            job_runs.mark_published(session, [run_id])
    return run_id, published
