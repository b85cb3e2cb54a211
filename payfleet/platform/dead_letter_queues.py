"""Dead letters: list, requeue and purge the messages Dramatiq gave up on.

They sit in `<queue>.XQ`. A requeue publishes the message back to its queue
with a fresh retry budget and waits for RabbitMQ's confirm before removing
it from the dead-letter queue, so a failure midway leaves it where it was."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pika
from dramatiq import Message
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import xq_name
from dramatiq.errors import DecodeError
from pika.adapters.blocking_connection import BlockingChannel


@dataclass(frozen=True)
class DeadLetter:
    message_id: str
    actor: str
    args: tuple[Any, ...]
    retries: int
    error: str

    def summary(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "actor": self.actor,
            "args": list(self.args),
            "retries": self.retries,
            "error": self.error,
        }


def _decode(message_id: str, body: bytes) -> Message[Any] | DeadLetter:
    """A dead letter that is not a Dramatiq message (published by hand, or
    corrupted) is shown as such rather than stopping the listing."""
    try:
        return Message.decode(body)
    except DecodeError as error:
        return DeadLetter(message_id, "(undecodable)", (), 0, f"{error}: {body[:200]!r}")


def _dead_letter(message: Message[Any]) -> DeadLetter:
    traceback = str(message.options.get("traceback") or "")
    last_line = traceback.strip().splitlines()[-1] if traceback.strip() else ""
    return DeadLetter(
        message.message_id,
        message.actor_name,
        tuple(message.args),
        message.options.get("retries", 0),
        last_line,
    )


@contextmanager
def _channel(broker: RabbitmqBroker) -> Iterator[BlockingChannel]:
    connection = pika.BlockingConnection(broker.parameters)
    try:
        yield connection.channel()
    finally:
        # Closing returns every message fetched but not acknowledged.
        connection.close()


def list_dead(broker: RabbitmqBroker, queue: str, limit: int = 1000) -> list[DeadLetter]:
    broker.declare_queue(queue, ensure=True)
    found: list[DeadLetter] = []
    with _channel(broker) as channel:
        while len(found) < limit:
            method, properties, body = channel.basic_get(xq_name(queue), auto_ack=False)
            if method is None:
                break
            decoded = _decode(str(properties.message_id or method.delivery_tag), body)
            found.append(decoded if isinstance(decoded, DeadLetter) else _dead_letter(decoded))
    return found


def requeue(
    broker: RabbitmqBroker,
    queue: str,
    *,
    message_ids: set[str] | None = None,
    before_requeue: Callable[[Message[Any]], None] = lambda message: None,
) -> list[DeadLetter]:
    """Move dead letters (all, or those named) back to `queue`."""
    broker.declare_queue(queue, ensure=True)
    moved: list[DeadLetter] = []
    with _channel(broker) as channel:
        while True:
            method, _, body = channel.basic_get(xq_name(queue), auto_ack=False)
            if method is None:
                break
            message = _decode(str(method.delivery_tag), body)
            # What is not asked for, or not a Dramatiq message, is left
            # unacknowledged: back in the queue when the channel closes.
            if isinstance(message, DeadLetter) or (
                message_ids is not None and message.message_id not in message_ids
            ):
                continue
            before_requeue(message)
            fresh = message.copy(queue_name=queue, options={**message.options, "retries": 0})
            broker.enqueue(fresh)  # confirmed before the ack below
            channel.basic_ack(method.delivery_tag)
            moved.append(_dead_letter(message))
    return moved


def purge(broker: RabbitmqBroker, queue: str) -> int:
    broker.declare_queue(queue, ensure=True)
    with _channel(broker) as channel:
        return int(channel.queue_purge(xq_name(queue)).method.message_count)
