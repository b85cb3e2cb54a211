"""Liveness, readiness and metrics."""

from __future__ import annotations

from typing import Any

import falcon
import pika
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    generate_latest,
    multiprocess,
)
from sqlalchemy import Engine, text


class Healthz:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class Readyz:
    """Ready when both PostgreSQL and RabbitMQ answer now."""

    def __init__(self, engine: Engine, broker_parameters: Any) -> None:
        self._engine, self._broker_parameters = engine, broker_parameters

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        checks = {"postgresql": self._postgresql(), "rabbitmq": self._rabbitmq()}
        ready = all(value == "ok" for value in checks.values())
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = {"ready": ready, "checks": checks}

    def _postgresql(self) -> str:
        try:
            with self._engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as error:
            return f"unreachable: {type(error).__name__}"
        return "ok"

    def _rabbitmq(self) -> str:
        try:
            # A fresh connection: the publisher's own may be idle-stale.
            pika.BlockingConnection(self._broker_parameters).close()
        except Exception as error:
            return f"unreachable: {type(error).__name__}"
        return "ok"


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
