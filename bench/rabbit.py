"""RabbitMQ seen from the bench: Dramatiq messages published with pika (the
wire format of Dramatiq 2: a JSON object per message), queue depths through
a passive declare, and publish counters from the management API."""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from typing import Any

import pika
import requests

from bench.fleet import AMQP_PASSWORD, AMQP_USER, MANAGEMENT_URL
from bench.procs import wait_until

# The reference worker of the apply scenario (bench/noop_worker.py).
NOOP_QUEUE = "bench_noop"
NOOP_ACTOR = "noop"


def _connection(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def wait_drained(url: str, queue: str, timeout: float, interval: float = 0.01) -> None:
    """Until `queue` holds no ready message, asked every `interval` s on one
    connection. A passive declare on an open channel is one round trip; a
    new connection for each look (`depth`) costs a handshake, and with it
    the end of a drain lasting half a second was known only to ±50 ms."""
    connection = _connection(url)
    try:
        channel = connection.channel()

        def drained() -> bool:
            return int(channel.queue_declare(queue, passive=True).method.message_count) == 0

        wait_until(drained, timeout, interval, f"{queue} drained")
    finally:
        connection.close()


def dramatiq_queue_arguments(queue: str) -> dict[str, Any]:
    """What Dramatiq's RabbitmqBroker declares a queue with (dead letters to `<queue>.XQ`)."""
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.XQ"}


def dramatiq_message(queue: str, actor: str, args: list[Any]) -> bytes:
    return json.dumps(
        {
            "queue_name": queue,
            "actor_name": actor,
            "args": args,
            "kwargs": {},
            "options": {},
            "message_id": str(uuid.uuid4()),
            "message_timestamp": int(time.time() * 1000),
        },
        separators=(",", ":"),
    ).encode()


def publish(url: str, queue: str, actor: str, args_list: Iterable[list[Any]]) -> int:
    """Publish one message per args (persistent, confirmed); returns how many."""
    connection = _connection(url)
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments=dramatiq_queue_arguments(queue))
        channel.confirm_delivery()
        properties = pika.BasicProperties(delivery_mode=2, priority=0)
        sent = 0
        for args in args_list:
            channel.basic_publish("", queue, dramatiq_message(queue, actor, args), properties)
            sent += 1
        return sent
    finally:
        connection.close()


def depth(url: str, queue: str) -> int:
    """Ready messages in `queue` (0 when it does not exist)."""
    connection = _connection(url)
    try:
        channel = connection.channel()
        try:
            return int(channel.queue_declare(queue, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker:
            return 0
    finally:
        connection.close()


def drain_args(url: str, queue: str, limit: int) -> list[Any]:
    """Take (and acknowledge) every ready message of `queue`, returning each
    one's first argument; at most `limit` messages."""
    found: list[Any] = []
    connection = _connection(url)
    try:
        channel = connection.channel()
        for _ in range(limit):
            method, _properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                break
            args = json.loads(body).get("args") or [None]
            found.append(args[0])
        return found
    finally:
        connection.close()


def management_available() -> bool:
    try:
        answer = requests.get(f"{MANAGEMENT_URL}/api/overview", auth=(AMQP_USER, AMQP_PASSWORD), timeout=3)
        return answer.status_code == 200
    except requests.RequestException:
        return False


def queue_stats(vhost: str, queue: str) -> dict[str, Any]:
    path = f"/api/queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(queue, safe='')}"
    answer = requests.get(f"{MANAGEMENT_URL}{path}", auth=(AMQP_USER, AMQP_PASSWORD), timeout=5)
    answer.raise_for_status()
    return dict(answer.json())


def published_count(vhost: str, queue: str, expect: int, timeout: float = 20.0) -> int | None:
    """The queue's `message_stats.publish` counter once it stops moving (the
    management plugin aggregates every few seconds). None without the plugin."""
    if not management_available():
        return None
    deadline = time.monotonic() + timeout
    last, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        value = int(queue_stats(vhost, queue).get("message_stats", {}).get("publish", 0))
        if value != last:
            last, stable_since = value, time.monotonic()
        elif value >= expect and time.monotonic() - stable_since > 6:
            return value
        time.sleep(1)
    return last
