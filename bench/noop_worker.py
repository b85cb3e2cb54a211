"""The reference of the apply scenario: Dramatiq workers on the bench vhost
whose actor does nothing, run with the same --processes and --threads:

    BENCH_BROKER_URL=amqp://… dramatiq bench.noop_worker --queues bench_noop …
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench.rabbit import NOOP_ACTOR, NOOP_QUEUE

broker = RabbitmqBroker(url=os.environ["BENCH_BROKER_URL"], confirm_delivery=True)
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name=NOOP_ACTOR, queue_name=NOOP_QUEUE, max_retries=0)
def noop(event_id: int) -> None:
    return None
