"""The admin API, behind `Authorization: Bearer $ADMIN_TOKEN`."""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Callable
from typing import Any

import falcon
from sqlalchemy.orm import Session, sessionmaker

from domain import events, orders, products, views
from domain.errors import InvalidRequest, NotFound
from ingress.errors import ApiError
from ingress.parsing import checked_text, json_object, optional, required
from payfleet.platform.outbox import EventInbox

MAX_BODY = 64 * 1024


class AdminResource:
    """Marks a resource as admin-only."""

    requires_admin = True


class AdminAuth:
    """Middleware: every admin resource needs the bearer token. It decides by
    the resource the router chose, not by the path's spelling ("//admin/…"
    routes to the same resource). The comparison is constant-time, and an
    unset ADMIN_TOKEN refuses everyone."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode() if token else None

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict[str, Any]
    ) -> None:
        if not getattr(resource, "requires_admin", False):
            return
        given = (req.get_header("Authorization") or "").encode()
        if self._expected is None or not hmac.compare_digest(given, self._expected):
            raise ApiError(falcon.HTTP_401, "unauthorized", "a valid admin bearer token is required")


INT4_MAX = 2**31 - 1  # on_hand and thresholds are PostgreSQL integers
INT8_MAX = 2**63 - 1  # prices are bigints (minor units)


def _non_negative(
    body: dict[str, Any], name: str, *, most: int = INT4_MAX, default: int | None = None
) -> int:
    if default is not None and body.get(name) is None:
        return default
    value = required(body, name, int)
    if not 0 <= value <= most:
        raise InvalidRequest(f"{name!r} must be between 0 and {most}")
    return value


def _sku(sku: str) -> str:
    # A path's %00 arrives as NUL, which PostgreSQL's text cannot hold.
    if not sku or len(sku) > 64:
        raise InvalidRequest("a SKU is 1 to 64 characters")
    return checked_text("sku", sku)


def parse_product(sku: str, body: dict[str, Any]) -> products.PutProduct:
    _sku(sku)
    currency = required(body, "currency", str)
    if len(currency) != 3 or not (currency.isascii() and currency.isalpha()):
        raise InvalidRequest(f"currency must be a 3-letter ISO code, got {currency!r}")
    return products.PutProduct(
        sku=sku,
        name=required(body, "name", str),
        price=_non_negative(body, "price", most=INT8_MAX),
        currency=currency.upper(),
        on_hand=_non_negative(body, "on_hand"),
        low_stock_threshold=_non_negative(body, "low_stock_threshold", default=0),
    )


class Products(AdminResource):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def on_put(self, req: falcon.Request, resp: falcon.Response, sku: str) -> None:
        command = parse_product(sku, json_object(req, MAX_BODY))
        with self._sessions.begin() as session:
            view, created = products.put_product(session, command)
        resp.status = falcon.HTTP_201 if created else falcon.HTTP_200
        resp.media = view

    def on_get(self, req: falcon.Request, resp: falcon.Response, sku: str) -> None:
        with self._sessions() as session:
            resp.media = products.get_product(session, checked_text("sku", sku))

    def on_get_list(self, req: falcon.Request, resp: falcon.Response) -> None:
        low_stock = req.get_param_as_bool("low_stock")
        with self._sessions() as session:
            resp.media = {"products": products.list_products(session, low_stock=low_stock, limit=_limit(req))}

    def on_get_movements(self, req: falcon.Request, resp: falcon.Response, sku: str) -> None:
        before = req.get_param_as_int("before", min_value=1)
        with self._sessions() as session:
            resp.media = products.movements(
                session, checked_text("sku", sku), limit=_limit(req), before=before
            )


class Orders(AdminResource):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def on_get(self, req: falcon.Request, resp: falcon.Response, order_id: str) -> None:
        with self._sessions() as session:
            resp.media = views.order_view(session, order_id)

    def on_get_list(self, req: falcon.Request, resp: falcon.Response) -> None:
        with self._sessions() as session:
            resp.media = {
                "orders": views.list_orders(session, status=req.get_param("status"), limit=_limit(req))
            }

    def on_post_ready_for_pickup(self, req: falcon.Request, resp: falcon.Response, order_id: str) -> None:
        self._change(resp, order_id, orders.mark_ready_for_pickup)

    def on_post_complete(self, req: falcon.Request, resp: falcon.Response, order_id: str) -> None:
        self._change(resp, order_id, orders.complete)

    def on_post_return(self, req: falcon.Request, resp: falcon.Response, order_id: str) -> None:
        lines = _lines(required(json_object(req, MAX_BODY), "lines", list))
        self._change(resp, order_id, lambda session, key: orders.record_return(session, key, lines))

    def _change(
        self, resp: falcon.Response, order_id: str, change: Callable[[Session, uuid.UUID], object]
    ) -> None:
        key = _order_key(order_id)
        with self._sessions() as session:
            views.order_view(session, order_id)  # 404 before anything is locked
            change(session, key)
            session.commit()
            resp.media = views.order_view(session, order_id)


def _order_key(order_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(order_id)
    except ValueError:
        raise NotFound(f"no order {order_id!r}") from None


def _lines(items: list[Any]) -> tuple[tuple[str, int], ...]:
    if not items:
        raise InvalidRequest("'lines' must name at least one line")
    lines: dict[str, int] = {}
    for item in items:
        if not isinstance(item, dict):
            raise InvalidRequest("each line must be an object with 'sku' and 'quantity'")
        sku, quantity = _sku(required(item, "sku", str)), required(item, "quantity", int)
        if not 0 < quantity <= INT4_MAX:
            raise InvalidRequest(f"a returned quantity is between 1 and {INT4_MAX}")
        lines[sku] = lines.get(sku, 0) + quantity
    return tuple(lines.items())


def _limit(req: falcon.Request) -> int:
    return int(req.get_param_as_int("limit", min_value=1, max_value=500, default=50))


class ReservationStats(AdminResource):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        with self._sessions() as session:
            resp.media = views.reservation_stats(session)


class Events(AdminResource):
    def __init__(self, sessions: sessionmaker[Session], inbox: EventInbox) -> None:
        self._sessions, self._inbox = sessions, inbox

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = req.get_param_as_int("limit", min_value=1, max_value=500, default=50)
        with self._sessions() as session:
            resp.media = {
                "events": views.list_events(
                    session, provider=req.get_param("provider"), status=req.get_param("status"), limit=limit
                )
            }

    def on_get_event(self, req: falcon.Request, resp: falcon.Response, event_id: int) -> None:
        with self._sessions() as session:
            resp.media = views.get_event(session, event_id)

    def on_post_replay(self, req: falcon.Request, resp: falcon.Response, event_id: int) -> None:
        published = self._inbox.replay(event_id)
        resp.status = falcon.HTTP_202
        resp.media = {"id": event_id, "status": "received", "published": published}

    def on_post_replay_many(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = json_object(req, MAX_BODY)
        chosen = replay_filter(body)
        with self._sessions() as session:
            selected = events.replay_selection(session, chosen)
        if optional(body, "dry_run", bool):
            resp.media = {"count": len(selected), "ids": selected, "dry_run": True}
            return
        reopened, published = self._inbox.replay_many(selected)
        resp.status = falcon.HTTP_202
        resp.media = {"count": len(reopened), "published": len(published)}


REPLAY_FIELDS = frozenset({"status", "provider", "type", "since", "until", "dry_run"})


def replay_filter(body: dict[str, Any]) -> events.ReplayFilter:
    # A misspelt filter would otherwise be ignored and replay more than meant.
    unknown = sorted(set(body) - REPLAY_FIELDS)
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(unknown)}; filters are {', '.join(sorted(REPLAY_FIELDS))}"
        )
    return events.replay_filter(
        *(optional(body, name, str) for name in ("status", "provider", "type", "since", "until"))
    )
