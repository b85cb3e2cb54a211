"""The fleet's messages and the one publisher that sends them.

A message carries a row id, never the row: the consumer reads the row, so a
message delivered twice or late still sees the truth. Publishing waits for
RabbitMQ's confirm; the rows a publish was about stay marked unpublished
until it is confirmed, and are published again later (by the outbox relay
or the scheduler) if it never is."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pika
import pika.exceptions
from dramatiq import Broker, Message
from dramatiq.errors import ConnectionClosed

log = logging.getLogger(__name__)

PAYMENTS_QUEUE = "payments"
JOBS_QUEUE = "jobs"
NOTIFICATIONS_QUEUE = "notifications"
QUEUES = (PAYMENTS_QUEUE, JOBS_QUEUE, NOTIFICATIONS_QUEUE)

APPLY_EVENT = "apply_event"
SEND_REVIEW_REQUEST = "send_review_request"


# The message option that carries the trace id of the row's work: Dramatiq
# keeps a message's options through every retry (and a dead letter keeps
# them for its requeue), so every attempt's log lines and provider calls
# carry it (workers.main's LogContext binds it).
TRACE_ID = "trace_id"


def _message(queue: str, actor: str, row_id: int, trace_id: str | None) -> Message[Any]:
    options = {TRACE_ID: trace_id} if trace_id else {}
    return Message(queue_name=queue, actor_name=actor, args=(row_id,), kwargs={}, options=options)


def apply_event_message(event_id: int, trace_id: str | None = None) -> Message[Any]:
    return _message(PAYMENTS_QUEUE, APPLY_EVENT, event_id, trace_id)


def run_message(actor: str, run_id: int, trace_id: str | None = None) -> Message[Any]:
    return _message(JOBS_QUEUE, actor, run_id, trace_id)


def review_request_message(request_id: int, trace_id: str | None = None) -> Message[Any]:
    return _message(NOTIFICATIONS_QUEUE, SEND_REVIEW_REQUEST, request_id, trace_id)


class Publisher:
    """Publishes messages with confirms and returns the keys RabbitMQ
    confirmed; the first failure stops the batch (its rows stay unpublished
    and are published again later).

    With a `deadline` (an HTTP request must not hang on a dead broker), a
    caller waits at most that long: publishing runs on one thread of its own
    (pika connections are per thread), so a publish stuck on a hung network
    can be abandoned and the caller goes on.
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
        self._local = threading.local()
        self._parameters = getattr(broker, "parameters", None)

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

    def send_events(
        self, event_ids: Sequence[int] | Mapping[int, str | None], *, background: bool = False
    ) -> list[int]:
        """Publish apply_event messages; given {event id: trace id}, each
        message carries its event's trace id. `background`: the caller
        publishes in the background and may wait out a hung broker itself
        (nothing waits for it), so the publish runs in its own thread,
        without the deadline's hand-over and back."""
        traces = event_ids if isinstance(event_ids, Mapping) else {}
        messages = [(event_id, apply_event_message(event_id, traces.get(event_id))) for event_id in event_ids]
        if background:
            return [] if self.paused else self._send(messages)
        return self.send(messages)

    def _send(self, messages: Sequence[tuple[int, Message[Any]]]) -> list[int]:
        if len(messages) > 1:
            return self._send_transacted(messages)
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

    def _send_transacted(self, messages: Sequence[tuple[int, Message[Any]]]) -> list[int]:
        """Many messages in one AMQP transaction: RabbitMQ answers the commit
        once all of them are safely queued (persistent messages on disk), so
        one wait covers them all where a confirm per message would wait out
        RabbitMQ's disk write once per message. All or none: a failure leaves
        every one of them to a later publish."""
        for attempt in range(2):
            try:
                for queue_name in {message.queue_name for _, message in messages}:
                    # Declared once per process through the broker (a no-op after).
                    self._broker.declare_queue(queue_name, ensure=True)  # type: ignore[call-arg]
                channel = self._transaction_channel()
                for _, message in messages:
                    self._broker.emit_before("enqueue", message, None)
                    properties = pika.BasicProperties(
                        delivery_mode=2, priority=message.options.get("broker_priority")
                    )
                    channel.basic_publish("", message.queue_name, message.encode(), properties)
                channel.tx_commit()
            except Exception as error:
                self._drop_transaction_channel()
                # A connection that died while idle (missed heartbeats) is
                # renewed once; anything else stops here.
                if attempt == 0 and isinstance(error, pika.exceptions.AMQPError | ConnectionClosed):
                    continue
                log.warning("publishing %d message(s) failed: %s", len(messages), error)
                self._pause_publishing()
                return []
            for _, message in messages:
                self._broker.emit_after("enqueue", message, None)
            return [key for key, _ in messages]
        return []

    def _transaction_channel(self) -> Any:
        # pika connections are not shared between threads: one per thread.
        channel = getattr(self._local, "channel", None)
        if channel is None or not channel.is_open:
            connection = pika.BlockingConnection(self._parameters)
            channel = connection.channel()
            channel.tx_select()
            self._local.connection, self._local.channel = connection, channel
        return channel

    def _drop_transaction_channel(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = self._local.channel = None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def _pause_publishing(self) -> None:
        if self._pause > 0 and not self.paused:
            self._paused_until = time.monotonic() + self._pause
            log.warning("publishing paused for %.1f s; stored rows are left to the relay", self._pause)


_POLL_SECONDS = 0.05
