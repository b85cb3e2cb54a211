"""The reference of the ingest scenario: a Falcon app doing only what a
Stripe webhook needs: verify the signature, INSERT … ON CONFLICT and COMMIT,
publish one message with publisher confirms, answer 200. One PostgreSQL and
one RabbitMQ connection per gunicorn thread (pika and a psycopg connection
are not shared between threads), opened on its first request.

    BARE_DSN=postgresql://… BARE_BROKER_URL=amqp://… BARE_SECRET=whsec_… \\
    gunicorn -c python:bench.bare_gunicorn_conf 'bench.bare_endpoint:app'
"""

from __future__ import annotations

import json
import os
import threading
from typing import cast

import falcon
import pika
import psycopg
import stripe

QUEUE = "bare_payments"
TABLE_SQL = (
    "CREATE TABLE IF NOT EXISTS bench_bare_events (id bigserial PRIMARY KEY, event_key text UNIQUE NOT NULL,"
    " event_type text NOT NULL, payload jsonb NOT NULL, received_at timestamptz NOT NULL DEFAULT now())"
)
INSERT_SQL = (
    "INSERT INTO bench_bare_events (event_key, event_type, payload) VALUES (%s, %s, %s)"
    " ON CONFLICT (event_key) DO NOTHING RETURNING id"
)


_mine = threading.local()


def _database() -> psycopg.Connection[tuple[object, ...]]:
    if not hasattr(_mine, "database"):
        _mine.database = psycopg.connect(os.environ["BARE_DSN"])
    return cast(psycopg.Connection[tuple[object, ...]], _mine.database)


def _channel() -> pika.adapters.blocking_connection.BlockingChannel:
    if not hasattr(_mine, "channel"):
        connection = pika.BlockingConnection(pika.URLParameters(os.environ["BARE_BROKER_URL"]))
        channel = connection.channel()
        channel.queue_declare(QUEUE, durable=True)
        channel.confirm_delivery()
        _mine.channel = channel
    return cast(pika.adapters.blocking_connection.BlockingChannel, _mine.channel)


class StripeWebhook:
    def __init__(self, secret: str) -> None:
        self._secret = secret

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        payload = req.bounded_stream.read()
        try:
            stripe.WebhookSignature.verify_header(
                payload.decode(), req.get_header("Stripe-Signature") or "", self._secret, 300
            )
            event = json.loads(payload)
        except (stripe.SignatureVerificationError, ValueError) as error:
            raise falcon.HTTPBadRequest(description=str(error)) from None
        db = _database()
        stored = db.execute(INSERT_SQL, (event["id"], event["type"], payload.decode())).fetchone()
        db.commit()
        if stored is not None:
            body = json.dumps({"args": [stored[0]]}).encode()
            _channel().basic_publish("", QUEUE, body, pika.BasicProperties(delivery_mode=2))
        resp.media = {"received": True, "duplicate": stored is None}


def create_app(secret: str) -> falcon.App[falcon.Request, falcon.Response]:
    app = falcon.App()
    app.add_route("/webhooks/stripe", StripeWebhook(secret))
    return app


def prepare(dsn: str) -> None:
    """Create the reference's table (the bench calls this before starting gunicorn)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TABLE_SQL)


app = create_app(os.environ.get("BARE_SECRET", ""))
