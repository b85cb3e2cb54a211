"""Liveness, readiness and metrics."""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import falcon
import pika
import psycopg
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    generate_latest,
    multiprocess,
)
from sqlalchemy import Engine


class Healthz:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class Readyz:
    """Ready when PostgreSQL and RabbitMQ answered a check within `timeout`.

    Cheap and bounded: a probe hitting a recent answer (younger than
    `cache_seconds`) gets it at once; otherwise it starts one check per
    dependency, in the background, and waits for it at most `timeout`.
    Probes arriving while a check runs do not start another: they get the last
    answer. So a black-holed network holds one thread for `timeout`, never
    every thread for as long as TCP takes to give up."""

    def __init__(
        self, engine: Engine, broker_parameters: Any, *, cache_seconds: float = 2.0, timeout: float = 2.0
    ) -> None:
        self._checks = {
            "postgresql": CachedCheck(postgresql_probe(engine, timeout), cache_seconds, timeout),
            "rabbitmq": CachedCheck(rabbitmq_probe(broker_parameters, timeout), cache_seconds, timeout),
        }

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        # Both checks start before either is waited for: together they take `timeout` at most.
        flights = {name: check.begin() for name, check in self._checks.items()}
        checks = {name: check.answer(flights[name]) for name, check in self._checks.items()}
        ready = all(value == "ok" for value in checks.values())
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = {"ready": ready, "checks": checks}


Probe = Callable[[], None]
"""Returns when the dependency answered; raises otherwise."""


@dataclass
class _Flight:
    """One check under way."""

    started: float
    done: threading.Event = field(default_factory=threading.Event)


class CachedCheck:
    """One dependency's readiness: at most one check at a time per process,
    its answer kept `ttl` seconds. A check slower than `timeout` answers
    "timed out" meanwhile, and its own answer replaces that when it ends."""

    def __init__(self, probe: Probe, ttl: float, timeout: float) -> None:
        self._probe, self._ttl, self._timeout = probe, ttl, timeout
        self._lock = threading.Lock()
        self._answer: str | None = None
        self._answered_at = 0.0
        self._flight: _Flight | None = None

    def begin(self) -> _Flight | None:
        """The check this caller started and must wait for; None when the
        last answer is to be taken as it is (fresh, or a check is running)."""
        with self._lock:
            fresh = self._answer is not None and time.monotonic() - self._answered_at < self._ttl
            if fresh or self._flight is not None:
                return None
            flight = self._flight = _Flight(time.monotonic())
        threading.Thread(target=self._run, args=(flight,), name="readyz-check", daemon=True).start()
        return flight

    def answer(self, flight: _Flight | None) -> str:
        if flight is not None:
            left = flight.started + self._timeout - time.monotonic()
            if not flight.done.wait(max(0.0, left)):
                self._record(f"timed out after {self._timeout:g} s")
        with self._lock:
            return self._answer or "not checked yet"

    def _run(self, flight: _Flight) -> None:
        try:
            self._probe()
            answer = "ok"
        except Exception as error:
            answer = f"unreachable: {type(error).__name__}"
        with self._lock:
            self._flight = None
        self._record(answer)
        flight.done.set()

    def _record(self, answer: str) -> None:
        with self._lock:
            self._answer, self._answered_at = answer, time.monotonic()


def postgresql_probe(engine: Engine, timeout: float) -> Probe:
    """A connection of its own, not one from the pool: a full pool or a
    pooled connection on a dead network would wait far longer than `timeout`.
    The user timeout makes the kernel give up on a peer that stopped
    acknowledging, so even an abandoned check ends."""
    conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    bounds = {
        "connect_timeout": max(2, math.ceil(timeout)),  # libpq's floor is 2 s
        "tcp_user_timeout": int(timeout * 1000),
        "options": f"-c statement_timeout={int(timeout * 1000)}",
    }

    def probe() -> None:
        with psycopg.connect(conninfo, autocommit=True, **bounds) as connection:  # type: ignore[arg-type]
            connection.execute("SELECT 1")

    return probe


def rabbitmq_probe(broker_parameters: Any, timeout: float) -> Probe:
    """A fresh connection (the publisher's own may be idle-stale), one try,
    every phase bounded: TCP connect, AMQP handshake (stack timeout), I/O."""
    parameters = [_bounded(p, timeout) for p in _as_list(broker_parameters)]

    def probe() -> None:
        pika.BlockingConnection(parameters).close()

    return probe


def _as_list(parameters: Any) -> list[Any]:
    return list(parameters) if isinstance(parameters, (list, tuple)) else [parameters]


def _bounded(parameters: Any, timeout: float) -> Any:
    bounded = copy.deepcopy(parameters)
    bounded.connection_attempts = 1
    bounded.retry_delay = 0
    bounded.socket_timeout = timeout
    bounded.stack_timeout = timeout
    bounded.blocked_connection_timeout = timeout
    return bounded


class Metrics:
    def __init__(self, multiprocess_dir: str) -> None:
        self._multiprocess = bool(multiprocess_dir)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        registry = REGISTRY
        # Under gunicorn each worker process counts on its own; the shared
        # directory set by the gunicorn config lets one scrape see them all.
        if self._multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = generate_latest(registry)


RESPONSES = Counter(
    "payfleet_http_responses_total",
    "HTTP answers by route template and status",
    ["route", "method", "status"],
)


class CountResponses:
    """Middleware: every answer counted by its route template (never the raw
    path, which would grow a series per order id), so 5xx and 503 alert."""

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        route = req.uri_template or "unrouted"
        RESPONSES.labels(route, req.method, resp.status_code).inc()
