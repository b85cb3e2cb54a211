"""Messages of the maintenance jobs and outgoing notifications, and a sender
that waits for RabbitMQ's confirm. A message carries a row id, never the row."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dramatiq import Broker, Message

log = logging.getLogger(__name__)

JOBS_QUEUE = "jobs"
NOTIFICATIONS_QUEUE = "notifications"
SEND_REVIEW_REQUEST = "send_review_request"


def run_message(actor: str, run_id: int) -> Message[Any]:
    return Message(queue_name=JOBS_QUEUE, actor_name=actor, args=(run_id,), kwargs={}, options={})


def review_request_message(request_id: int) -> Message[Any]:
    return Message(
        queue_name=NOTIFICATIONS_QUEUE,
        actor_name=SEND_REVIEW_REQUEST,
        args=(request_id,),
        kwargs={},
        options={},
    )


class MessageSender:
    """Publishes messages with confirms and returns the keys RabbitMQ
    confirmed; the first failure stops the batch (the rows stay unpublished
    and are published again later). With a `deadline`, a caller waits at most
    that long (an HTTP request must not hang on a dead broker)."""

    def __init__(self, broker: Broker, *, deadline: float | None = None) -> None:
        self._broker = broker
        self._deadline = deadline
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="job-sender") if deadline else None

    def send(self, messages: Sequence[tuple[int, Message[Any]]]) -> list[int]:
        if self._thread is None:
            return self._send(messages)
        future = self._thread.submit(self._send, list(messages))
        try:
            return future.result(timeout=self._deadline)
        except TimeoutError:
            future.cancel()
            log.warning("publishing %d message(s) timed out; left for a later publish", len(messages))
            return []

    def _send(self, messages: Sequence[tuple[int, Message[Any]]]) -> list[int]:
        sent: list[int] = []
        for key, message in messages:
            try:
                self._broker.enqueue(message)
            except Exception as error:  # pika lets some connection failures through unconverted
                log.warning("publishing %s %s failed: %s", message.actor_name, key, error)
                break
            sent.append(key)
        return sent
