"""The Dramatiq broker every payfleet process shares: RabbitMQ through pika,
publisher confirms on, and retry middleware that waits the declared delays."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import dramatiq.brokers.rabbitmq as rabbitmq
from dramatiq import Broker, Middleware, Retry
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from payfleet.platform.config import Settings


class RetryDelays(Retries):
    """Retries that wait exactly the delays an actor declares
    (`retry_delays=(10_000, 30_000)`, in ms) instead of jittered exponential
    backoff; the last delay repeats if there are more retries than delays."""

    @property
    def actor_options(self) -> set[str]:
        return {*super().actor_options, "retry_delays"}

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        actor = broker.get_actor(message.actor_name)
        delays = actor.options.get("retry_delays")
        throws = actor.options.get("throws") or ()
        if delays and exception is not None and not isinstance(exception, (Retry, *throws)):
            retries = message.options.get("retries", 0)
            exception = Retry(
                f"{type(exception).__name__}: {exception}", delay=delays[min(retries, len(delays) - 1)]
            )
        super().after_process_message(broker, message, result=result, exception=exception)  # type: ignore[no-untyped-call]


# pika's defaults wait a minute or more on a hung network, and a publisher
# with confirms only notices a dead peer through heartbeats: short ones keep a
# webhook from hanging on RabbitMQ. Values given in BROKER_URL win.
CONNECTION_DEFAULTS = {
    "heartbeat": "10",
    "connection_attempts": "2",
    "retry_delay": "0.5",
    "socket_timeout": "5",
    "stack_timeout": "10",
    "blocked_connection_timeout": "30",
}


def with_connection_defaults(url: str) -> str:
    parts = urlsplit(url)
    query = {**CONNECTION_DEFAULTS, **dict(parse_qsl(parts.query))}
    return urlunsplit(parts._replace(query=urlencode(query)))


def build_broker(settings: Settings) -> RabbitmqBroker:
    # Dramatiq declares `<queue>.XQ` with this TTL; RabbitMQ then drops dead
    # letters silently, so payfleet keeps them far longer than the 7-day default.
    rabbitmq.DEAD_MESSAGE_TTL = settings.dead_letter_ttl_seconds * 1000
    middleware: list[Middleware] = [
        AgeLimit(),
        TimeLimit(time_limit=int(settings.event_time_limit_seconds * 1000)),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        RetryDelays(max_retries=settings.event_max_attempts - 1),
    ]
    url = with_connection_defaults(settings.broker_url)
    return RabbitmqBroker(url=url, confirm_delivery=True, middleware=middleware)
