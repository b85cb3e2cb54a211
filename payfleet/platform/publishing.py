"""The fleet's messages and the one publisher that sends them.

A message carries a row id, never the row: the consumer reads the row, so a
message delivered twice or late still sees the truth. Publishing waits for
RabbitMQ's confirm; the rows a publish was about stay marked unpublished
until it is confirmed, and are published again later (by the outbox relay
or the scheduler) if it never is."""

from __future__ import annotations

import logging
import time
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
    and are published again later).

    With a `deadline` (an HTTP request must not hang on a dead broker), a
    caller waits at most that long: publishing runs on one thread of its own
    (pika connections are per thread), so a publish stuck on a hung network
    can be abandoned and the request still answers once its row is stored.
    After a failure or a deadline, publishing pauses for `pause` seconds:
    callers return at once (their rows are left to the relay) instead of
    each waiting out the deadline behind a broker that is away, and the
    first call after the pause tries again."""

    def __init__(self, broker: Broker, *, deadline: float | None = None, pause: float = 0.0) -> None:
        self._broker = broker
        self._deadline = deadline
        self._pause = pause
        self._paused_until = 0.0
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="publisher") if deadline else None

    @property
    def paused(self) -> bool:
        return time.monotonic() < self._paused_until

    def send(self, messages: Sequence[tuple[int, Message[Any]]]) -> list[int]:
        if self.paused:
            return []
        if self._thread is None or self._deadline is None:
            return self._send(messages)
        future = self._thread.submit(self._send, list(messages))
        give_up_at = time.monotonic() + self._deadline
        # Polled, not one long wait: a caller queued behind a publish that
        # failed or hung returns as soon as that one pauses publishing.
        while True:
            try:
                return future.result(timeout=min(_POLL_SECONDS, max(0.0, give_up_at - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= give_up_at or self.paused:
                    break
        # If it still goes through later the message is sent twice, which
        # every consumer treats as a duplicate.
        future.cancel()
        if not self.paused:
            log.warning("publishing %d message(s) timed out; left for a later publish", len(messages))
        self._pause_publishing()
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
                self._pause_publishing()
                break
            sent.append(key)
        return sent

    def _pause_publishing(self) -> None:
        if self._pause > 0 and not self.paused:
            self._paused_until = time.monotonic() + self._pause
            log.warning("publishing paused for %.1f s; stored rows are left to the relay", self._pause)


_POLL_SECONDS = 0.05
