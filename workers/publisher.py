"""Publishing stored events to RabbitMQ, after their commit.

A message carries the event's id, never the event: the worker reads the row,
so a message delivered twice or late still sees the truth."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from dramatiq import Broker, Message
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from domain.events import EventFacts, mark_published, record_event, reopen

log = logging.getLogger(__name__)

PAYMENTS_QUEUE = "payments"
APPLY_EVENT = "apply_event"


def apply_event_message(event_id: int) -> Message:  # type: ignore[type-arg]
    return Message(queue_name=PAYMENTS_QUEUE, actor_name=APPLY_EVENT, args=(event_id,), kwargs={}, options={})


class EventPublisher:
    """Publishes event ids with confirms. With a `deadline`, a caller waits at
    most that long: publishing runs on one thread of its own (pika connections
    are per thread), so a publish stuck on a hung network can be abandoned,
    and a webhook still answers once its event is stored."""

    def __init__(self, broker: Broker, *, deadline: float | None = None) -> None:
        self._broker = broker
        self._deadline = deadline
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="publisher") if deadline else None

    def send(self, event_ids: Sequence[int]) -> list[int]:
        """Publish each event; returns the ids RabbitMQ confirmed. An outage or
        the deadline stops the batch and is logged, not raised: the events are
        stored, and the outbox relay publishes the rest later."""
        if self._thread is None:
            return self._send(event_ids)
        future = self._thread.submit(self._send, list(event_ids))
        try:
            return future.result(timeout=self._deadline)
        except TimeoutError:
            # If it still goes through later the event is published twice,
            # which the worker treats as a duplicate.
            future.cancel()
            log.warning("publishing events %s timed out, left to the outbox relay", list(event_ids))
            return []

    def _send(self, event_ids: Sequence[int]) -> list[int]:
        sent: list[int] = []
        for event_id in event_ids:
            try:
                self._broker.enqueue(apply_event_message(event_id))
            # Not only BrokerError: pika lets some connection failures through
            # unconverted (a handshake timeout on a hung network). Whatever
            # stops a publish, the event is stored and the relay retries it.
            except Exception as error:
                log.warning("publishing event %s failed, left to the outbox relay: %s", event_id, error)
                break
            sent.append(event_id)
        return sent


class EventInbox:
    """Persist first: an event is committed before anything is published or
    answered, so a 2xx always means the event is in PostgreSQL."""

    def __init__(self, sessions: sessionmaker[Session], publisher: EventPublisher) -> None:
        self._sessions = sessions
        self._publisher = publisher

    def accept(self, facts: EventFacts) -> bool:
        """Store and publish one event; returns whether it was a duplicate."""
        with self._sessions() as session:
            event_id, duplicate = record_event(session, facts)
            session.commit()
        if not duplicate:
            self._publish(event_id)
        return duplicate

    def replay(self, event_id: int) -> bool:
        """Reopen an unmatched, failed or ignored event and publish it again;
        returns whether RabbitMQ confirmed (if not, the relay will)."""
        with self._sessions() as session:
            reopen(session, event_id)
            session.commit()
        return self._publish(event_id)

    def _publish(self, event_id: int) -> bool:
        if not self._publisher.send([event_id]):
            return False
        # Losing this mark only means the relay publishes the event once more,
        # which the worker treats as a duplicate: not worth failing the answer.
        try:
            with self._sessions() as session:
                mark_published(session, [event_id])
                session.commit()
        except SQLAlchemyError as error:
            log.warning("event %s published but not marked: %s", event_id, error)
        return True
