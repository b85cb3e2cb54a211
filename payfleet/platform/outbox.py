"""Persist first, then publish: the row is the outbox.

A stored provider event and a manual job run are committed before anything
is published or answered, so a 2xx always means the row is in PostgreSQL.
A publish that fails or times out leaves the row unpublished; the
scheduler publishes it later."""

from __future__ import annotations

import logging

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from domain import job_runs
from domain.events import EventFacts, mark_published, record_event, reopen
from domain.job_table import JobTable
from payfleet.platform.publishing import Publisher, run_message

log = logging.getLogger(__name__)


class EventInbox:
    def __init__(self, sessions: sessionmaker[Session], publisher: Publisher) -> None:
        self._sessions = sessions
        self._publisher = publisher

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
        return self._publish(event_id)

    def _publish(self, event_id: int) -> bool:
        if not self._publisher.send_events([event_id]):
            return False
        # Losing this mark only means the relay publishes the event once more,
        # which the worker treats as a duplicate: not worth failing the answer.
        try:
            with self._sessions.begin() as session:
                mark_published(session, [event_id])
        except SQLAlchemyError as error:
            log.warning("event %s published but not marked: %s", event_id, error)
        return True


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
