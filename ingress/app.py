"""The Falcon app. `create_app` takes its collaborators; `get_app` reads the
configuration and is what gunicorn loads (`ingress.app:get_app()`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import falcon
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from domain.circuit import CircuitPolicy
from domain.gateways import (
    MonetbilApiGateway,
    MonetbilGateway,
    MonetbilLinks,
    StripeApiGateway,
    StripeGateway,
    payment_providers,
)
from domain.order_bounds import OrderBounds
from ingress import admin_jobs, admin_routing, errors
from ingress.admin import AdminAuth, Events, Orders, Products, ReservationStats
from ingress.carts import Carts
from ingress.checkout import Checkout, Router
from ingress.health import CountResponses, Healthz, Metrics, Readyz
from ingress.openapi import OpenApi
from ingress.webhooks import MonetbilWebhook, StripeWebhook
from payfleet.platform.broker import build_broker
from payfleet.platform.config import Settings, load_settings
from payfleet.platform.db import engine_for, make_sessions
from payfleet.platform.outbox import EventInbox
from payfleet.platform.publishing import Publisher


@dataclass(frozen=True)
class Collaborators:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    publisher: Publisher
    stripe: StripeGateway
    monetbil: MonetbilGateway
    broker_parameters: object


def create_app(c: Collaborators) -> falcon.App[falcon.Request, falcon.Response]:
    s = c.settings
    # Counting first, so a refused admin request is counted too.
    app = falcon.App(middleware=[CountResponses(), AdminAuth(s.admin_token)])  # type: ignore[arg-type]
    errors.install(app)
    inbox = EventInbox(c.sessions, c.publisher)
    app.add_route(
        "/webhooks/stripe",
        StripeWebhook(inbox, s.stripe_webhook_secrets, s.webhook_tolerance_seconds, s.max_body_bytes),
    )
    app.add_route("/webhooks/monetbil", MonetbilWebhook(inbox, s.monetbil_service_secret, s.max_body_bytes))
    window = timedelta(seconds=s.order_payment_window_seconds)
    links = MonetbilLinks(
        notify_url=f"{s.public_base_url}/webhooks/monetbil",
        return_url=s.monetbil_return_url or f"{s.public_base_url}/",
    )
    bounds = OrderBounds(s.max_order_units, s.max_order_lines)
    router = Router(payment_providers(c.stripe, c.monetbil, links), circuit_policy(s))
    app.add_route("/checkout", Checkout(c.sessions, router, window, s.max_body_bytes, bounds))
    admin_routing.add_routes(app, c.sessions, router)
    carts = Carts(c.sessions, timedelta(seconds=s.cart_ttl_seconds), bounds)
    app.add_route("/carts", carts)
    app.add_route("/carts/{cart_id}", carts, suffix="cart")
    app.add_route("/carts/{cart_id}/items", carts, suffix="items")
    products = Products(c.sessions)
    app.add_route("/admin/products", products, suffix="list")
    app.add_route("/admin/products/{sku}", products)
    app.add_route("/admin/products/{sku}/movements", products, suffix="movements")
    orders = Orders(c.sessions)
    app.add_route("/admin/orders", orders, suffix="list")
    app.add_route("/admin/orders/{order_id}", orders)
    for action in ("ready-for-pickup", "complete", "return"):
        app.add_route(f"/admin/orders/{{order_id}}/{action}", orders, suffix=action.replace("-", "_"))
    app.add_route("/admin/reservations/stats", ReservationStats(c.sessions))
    events = Events(c.sessions, inbox)
    app.add_route("/admin/events", events)
    app.add_route("/admin/events/{event_id:int}", events, suffix="event")
    app.add_route("/admin/events/{event_id:int}/replay", events, suffix="replay")
    app.add_route("/admin/events/replay", events, suffix="replay_many")
    admin_jobs.add_routes(app, c.sessions, s, c.publisher)
    app.add_route("/healthz", Healthz())
    readyz = Readyz(
        c.engine, c.broker_parameters, cache_seconds=s.readyz_cache_seconds, timeout=s.readyz_timeout_seconds
    )
    app.add_route("/readyz", readyz)
    app.add_route("/metrics", Metrics(s.prometheus_multiproc_dir))
    app.add_route("/openapi.json", OpenApi())
    return app


def circuit_policy(s: Settings) -> CircuitPolicy:
    return CircuitPolicy(
        failures=s.routing_circuit_failures,
        window=timedelta(seconds=s.routing_circuit_window_seconds),
        cooldown=timedelta(seconds=s.routing_circuit_cooldown_seconds),
    )


def collaborators(settings: Settings) -> Collaborators:
    engine = engine_for(settings, pool_size=settings.db_pool_size, max_overflow=4)
    broker = build_broker(settings)
    return Collaborators(
        settings=settings,
        engine=engine,
        sessions=make_sessions(engine),
        publisher=Publisher(
            broker, deadline=settings.publish_timeout_seconds, pause=settings.publish_pause_seconds
        ),
        stripe=StripeApiGateway(
            settings.stripe_api_key, settings.stripe_api_base, timeout=settings.stripe_timeout_seconds
        ),
        monetbil=MonetbilApiGateway(
            settings.monetbil_service_key,
            settings.monetbil_api_base,
            timeout=settings.monetbil_timeout_seconds,
        ),
        broker_parameters=broker.parameters,
    )


def get_app() -> falcon.App[falcon.Request, falcon.Response]:
    return create_app(collaborators(load_settings()))
