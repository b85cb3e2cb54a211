"""What a Dramatiq worker process imports (`dramatiq workers.main`): reads
the configuration once and wires the logs, the broker, the database and the
actors."""

from __future__ import annotations

import gc

# A worker process's imports make some 100,000 objects that live as long as
# the process; the collector walked them again and again while they came in
# (0.036 s of a 0.285 s import, on the clock from `payfleet worker` to the
# first event). Off until they are in; at the end of this module they are
# frozen out of its way and it is on again.
gc.disable()

import logging
import threading
from typing import Any

import dramatiq
from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.errors import BrokerConnectionError
from sqlalchemy import Engine

from domain import gateways
from domain.job_table import JOBS
from payfleet.platform import logs
from payfleet.platform.broker import build_broker
from payfleet.platform.config import load_settings
from payfleet.platform.db import engine_for, make_sessions
from payfleet.platform.publishing import APPLY_EVENT, TRACE_ID
from workers.apply_events import declare_event_actors
from workers.job_runner import declare_job_actors, job_gateways
from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class LogContext(Middleware):
    """Every line logged while a message is handled names what the message
    names: the event of `apply_event` (and of its give-up callback), the run
    and job of a job actor, and the trace id its options carry (the provider
    calls it makes carry that too). Hooks run on the worker thread that
    handles the message, so the context is that thread's alone."""

    def __init__(self) -> None:
        self._jobs = {job.actor: job.name for job in JOBS}
        self._bound = threading.local()

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        trace_id = _trace_id(message.actor_name, message.args, message.options)
        self._bound.calls = gateways.trace_calls(trace_id)
        self._bound.token = logs.bind(trace_id=trace_id, **self._fields(message.actor_name, message.args))

    def after_process_message(self, broker: Broker, message: MessageProxy, **_: Any) -> None:
        token = getattr(self._bound, "token", None)
        if token is not None:
            self._bound.token = None
            logs.unbind(token)
        calls = getattr(self._bound, "calls", None)
        if calls is not None:
            self._bound.calls = None
            gateways.untrace_calls(calls)

    after_skip_message = after_process_message

    def _fields(self, actor: str, args: tuple[Any, ...]) -> dict[str, Any]:
        if actor == APPLY_EVENT and args:
            return {"event_id": args[0]}
        if actor == "give_up_event" and args and isinstance(args[0], dict):
            return {"event_id": (args[0].get("args") or [None])[0]}
        if actor in self._jobs and args:
            return {"run_id": args[0], "job": self._jobs[actor]}
        return {}


class WarmStart(Middleware):
    """A worker process's set-up, done once before its threads start.

    The queues are declared on one connection, which is then closed. Left
    to Dramatiq, each of the process's six consumer threads (one per queue
    and per delay queue) found them still to declare and opened a connection
    of its own for that, beside its consumer's: twelve AMQP connections per
    process at start instead of six, each a handshake for pika and for
    RabbitMQ while events wait. If RabbitMQ cannot be reached, the queues
    stay pending and the consumer threads declare them once it is back, as
    before. Meanwhile a thread opens the pool's first database connection,
    which the first batch would otherwise wait for."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def after_process_boot(self, broker: Broker) -> None:
        threading.Thread(target=self._connect_database, name="warm-start", daemon=True).start()
        assert isinstance(broker, RabbitmqBroker)
        try:
            for queue in sorted(broker.get_declared_queues()):
                broker.declare_queue(queue, ensure=True)
        except BrokerConnectionError:
            # Not a warning of its own: the outage already is one (logs.py).
            log.info("RabbitMQ unreachable at start: the consumers declare the queues once it is back")
        finally:
            # This thread never uses it again, nor services its heartbeats.
            del broker.connection

    def _connect_database(self) -> None:
        try:
            self._engine.connect().close()  # back to the pool, open
        except Exception:  # the first batch connects, and says why, itself
            log.debug("could not open a database connection at start", exc_info=True)


def _trace_id(actor: str, args: tuple[Any, ...], options: dict[str, Any]) -> str | None:
    """A message's trace id; a give-up callback's is its failed message's."""
    if actor.startswith("give_up_") and args and isinstance(args[0], dict):
        options = args[0].get("options") or {}
    found = options.get(TRACE_ID)
    return found if isinstance(found, str) else None


settings = load_settings()
# Dramatiq's CLI has already pointed the root logger at this process's log
# pipe (sys.stderr here) in its own format; payfleet's handler replaces it.
logs.configure("worker", settings.log_format, replace=True)
broker = build_broker(settings)
# Dramatiq's Prometheus middleware, with an exporter that survives a taken port.
broker.add_middleware(WorkerMetrics())
broker.add_middleware(LogContext())
dramatiq.set_broker(broker)
engine = engine_for(settings, pool_size=settings.db_pool_size, max_overflow=4)
sessions = make_sessions(engine)
broker.add_middleware(WarmStart(engine))
declare_event_actors(broker, sessions, settings)
declare_job_actors(broker, sessions, settings, job_gateways(settings))
# What the import made stays for the process's life: the collector skips it
# from now on (the little of it that is garbage stays too; a full collection
# first would cost about what the pause saved).
gc.freeze()
gc.enable()
