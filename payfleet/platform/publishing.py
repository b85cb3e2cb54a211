"""The fleet's messages and the one publisher that sends them.

A message carries a row id, never the row: the consumer reads the row, so a
message delivered twice or late still sees the truth. Publishing waits for
RabbitMQ's confirm; the rows a publish was about stay marked unpublished
until it is confirmed, and are published again later (by the outbox relay
or the scheduler) if it never is."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dramatiq import Broker, Message

log = logging.getLogger(__name__)

PAYMENTS_QUEUE = "payments"
JOBS_QUEUE = "jobs"
NOTIFICATIONS_QUEUE = "notifications"
QUEUES = (PAYMENTS_QUEUE, JOBS_QUEUE, NOTIFICATIONS_QUEUE)

APPLY_EVENT = "apply_event"
SEND_REVIEW_REQUEST = "send_review_request"


def _message(queue: str, actor: str, row_id: int) -> Message[Any]:
    return Message(queue_name=queue, actor_name=actor, args=(row_id,), kwargs={}, options={})


def apply_event_message(event_id: int) -> Message[Any]:
    return _message(PAYMENTS_QUEUE, APPLY_EVENT, event_id)


def run_message(actor: str, run_id: int) -> Message[Any]:
    return _message(JOBS_QUEUE, actor, run_id)


def review_request_message(request_id: int) -> Message[Any]:
    return _message(NOTIFICATIONS_QUEUE, SEND_REVIEW_REQUEST, request_id)


class Publisher:
    """Publishes messages with confirms and returns the keys RabbitMQ
    confirmed; the first failure stops the batch (its rows stay unpublished
    and are published again later). With a `deadline`, a caller waits at most
    that long: publishing runs on one thread of its own (pika connections are
    per thread), so a publish stuck on a hung network can be abandoned and an
    HTTP request still answers once its row is stored."""

    def __init__(self, broker: Broker, *, deadline: float | None = None) -> None:
        self._broker = broker
        self._deadline = deadline
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="publisher") if deadline else None

    def send(self, messages: Sequence[tuple[int, Message[Any]]]) -> list[int]:
        if self._thread is None:
            return self._send(messages)
        future = self._thread.submit(self._send, list(messages))
        try:
            return future.result(timeout=self._deadline)
        except TimeoutError:
            # If it still goes through later the message is sent twice, which
            # every consumer treats as a duplicate.
            future.cancel()
            log.warning("publishing %d message(s) timed out; left for a later publish", len(messages))
            return []

    def send_events(self, event_ids: Sequence[int]) -> list[int]:
        return self.send([(event_id, apply_event_message(event_id)) for event_id in event_ids])

    def _send(self, messages: Sequence[tuple[int, Message[Any]]]) -> list[int]:
        sent: list[int] = []
        for key, message in messages:
            try:
                self._broker.enqueue(message)
            # Not only BrokerError: pika lets some connection failures through
            # unconverted (a handshake timeout on a hung network). Whatever
            # stops a publish, the row is stored and is published later.
            except Exception as error:
                log.warning("publishing %s %s failed: %s", message.actor_name, key, error)
                break
            sent.append(key)
        return sent
