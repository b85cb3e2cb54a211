"""Publishing stored events to RabbitMQ, after their commit.

A message carries the event's id, never the event: the worker reads the row,
so a message delivered twice or late still sees the truth."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dramatiq import Broker, Message
from dramatiq.errors import BrokerError

log = logging.getLogger(__name__)

PAYMENTS_QUEUE = "payments"
APPLY_EVENT = "apply_event"


def apply_event_message(event_id: int) -> Message:  # type: ignore[type-arg]
    return Message(queue_name=PAYMENTS_QUEUE, actor_name=APPLY_EVENT, args=(event_id,), kwargs={}, options={})


class EventPublisher:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def send(self, event_ids: Sequence[int]) -> list[int]:
        """Publish each event, waiting for RabbitMQ's confirm; returns the ids
        confirmed. A broker outage stops the batch and is logged, not raised:
        the events are stored, and the outbox relay publishes the rest later."""
        sent: list[int] = []
        for event_id in event_ids:
            try:
                self._broker.enqueue(apply_event_message(event_id))
            except BrokerError as error:
                log.warning("publishing event %s failed, left to the outbox relay: %s", event_id, error)
                break
            sent.append(event_id)
        return sent
