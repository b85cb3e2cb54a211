"""Carts: POST /carts, GET /carts/{id}, PUT /carts/{id}/items."""

from __future__ import annotations

from datetime import timedelta

import falcon
from sqlalchemy.orm import Session, sessionmaker

from domain import carts
from domain.errors import InvalidRequest
from domain.order_bounds import OrderBounds
from ingress.parsing import json_object, required

MAX_BODY = 16 * 1024


class Carts:
    def __init__(self, sessions: sessionmaker[Session], ttl: timedelta, bounds: OrderBounds) -> None:
        self._sessions, self._ttl, self._bounds = sessions, ttl, bounds

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        with self._sessions() as session:
            cart = carts.create_cart(session, self._ttl)
            session.commit()
            resp.media = carts.cart_view(session, str(cart.id))
        resp.status = falcon.HTTP_201

    def on_get_cart(self, req: falcon.Request, resp: falcon.Response, cart_id: str) -> None:
        with self._sessions() as session:
            resp.media = carts.cart_view(session, cart_id)

    def on_put_items(self, req: falcon.Request, resp: falcon.Response, cart_id: str) -> None:
        body = json_object(req, MAX_BODY)
        sku, quantity = required(body, "sku", str), required(body, "quantity", int)
        if not sku or len(sku) > 64 or quantity < 0:
            raise InvalidRequest("sku must be 1-64 characters and quantity at least 0 (0 removes)")
        self._bounds.check_units(quantity)  # no line may hold more than an order
        with self._sessions() as session:
            carts.set_item(session, cart_id, sku, quantity, self._ttl, self._bounds)
            session.commit()
            resp.media = carts.cart_view(session, cart_id)
