"""`GET /openapi.json`: the OpenAPI 3.1 description of the ingress's routes.

Kept as Python data beside the resources it describes: a route added to
`app.py` without a line here fails tests/test_openapi.py, which also checks
with schemathesis that a live ingress answers as described. Bodies are
described as far as a client relies on them; objects stay open to new fields.
"""

from __future__ import annotations

from typing import Any

import falcon

JSON = "application/json"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str) -> Schema:
    return {"type": [kind, "null"]}


def _object(required: list[str] | None = None, **properties: Schema) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _list_of(key: str, item: Schema) -> Schema:
    return _object([key], **{key: {"type": "array", "items": item}})


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> Schema:
    return _json(ref("Error"), description)


# Answers that many routes share.
BAD_INPUT = _error("bad input (malformed_body, invalid_request, invalid_parameter); nothing changed")
UNAUTHORIZED = _error("no or a wrong admin bearer token (unauthorized)")
NOT_FOUND = _error("no such resource (not_found)")
CONFLICT = _error("the resource's state forbids this (conflict); nothing changed")
UNAVAILABLE = _error("PostgreSQL is unavailable (database_unavailable); retry later")
TOO_LARGE = _error("the body is over the limit (body_too_large)")

_STRING_ID: Schema = {"type": "string"}
_TIMESTAMP: Schema = {"type": ["string", "null"], "format": "date-time"}

SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
        "description": 'Every failure: a stable code and a text. Some carry more fields (e.g. "sku", '
        '"available" for insufficient_stock; "max_units" or "max_lines" for order_too_large).',
    },
    "Line": _object(
        ["sku", "quantity"],
        sku={"type": "string", "minLength": 1, "maxLength": 64},
        quantity={"type": "integer"},
    ),
    "Checkout": {
        "type": "object",
        "required": ["currency"],
        "description": "Either `items` or `cart_id`.",
        "properties": {
            "items": {"type": "array", "items": ref("Line")},
            "cart_id": {"type": "string"},
            "provider": {"type": "string", "description": '"auto" (the default), "stripe" or "monetbil"'},
            "currency": {"type": "string", "minLength": 3, "maxLength": 3},
            "country": {"type": "string", "minLength": 2, "maxLength": 2},
            "customer": _object(email={"type": "string"}, phone={"type": "string"}),
        },
    },
    "CheckoutAnswer": _object(
        ["order_id", "status", "expires_at", "payment"],
        order_id=_STRING_ID,
        status={"type": "string"},
        expires_at={"type": "string", "format": "date-time"},
        payment=_object(
            ["provider", "provider_payment_id"],
            provider={"type": "string"},
            provider_payment_id={"type": "string"},
            client_secret={"type": "string"},
            payment_url={"type": "string"},
        ),
        routing={"type": "object", "description": 'with "provider": "auto": how the provider was chosen'},
    ),
    "Cart": _object(
        ["id", "items", "expires_at", "expired", "order_id"],
        id=_STRING_ID,
        items={
            "type": "array",
            "items": _object(
                ["sku", "quantity", "unit_price", "currency"],
                sku={"type": "string"},
                quantity={"type": "integer"},
                unit_price={"type": "integer"},
                currency={"type": "string"},
            ),
        },
        expires_at={"type": "string", "format": "date-time"},
        expired={"type": "boolean"},
        order_id=_nullable("string"),
    ),
    "PutProduct": _object(
        ["name", "price", "currency", "on_hand"],
        name={"type": "string"},
        price={"type": "integer", "minimum": 0, "description": "minor units"},
        currency={"type": "string", "minLength": 3, "maxLength": 3},
        on_hand={"type": "integer", "minimum": 0},
        low_stock_threshold={"type": "integer", "minimum": 0},
    ),
    "Product": _object(
        ["sku", "name", "price", "currency", "on_hand", "reserved", "available", "low_stock"],
        sku={"type": "string"},
        name={"type": "string"},
        price={"type": "integer"},
        currency={"type": "string"},
        on_hand={"type": "integer"},
        reserved={"type": "integer"},
        available={"type": "integer"},
        low_stock_threshold={"type": "integer"},
        low_stock={"type": "boolean"},
    ),
    "Movement": _object(
        ["id", "sku", "type", "quantity", "before", "after"],
        id={"type": "integer"},
        at=_TIMESTAMP,
        sku={"type": "string"},
        type={"type": "string", "enum": ["sale", "restock", "return", "adjustment"]},
        quantity={"type": "integer"},
        before={"type": "integer"},
        after={"type": "integer"},
        reason=_nullable("string"),
        reference=_nullable("string"),
    ),
    "OrderSummary": _object(
        ["id", "status", "total_amount", "currency"],
        id=_STRING_ID,
        status={"type": "string"},
        total_amount={"type": "integer"},
        currency={"type": "string"},
        created_at=_TIMESTAMP,
        updated_at=_TIMESTAMP,
    ),
    "Order": _object(
        ["id", "status", "payment", "lines", "timeline"],
        id=_STRING_ID,
        status={"type": "string"},
        currency={"type": "string"},
        total_amount={"type": "integer"},
        customer={"type": "object"},
        created_at=_TIMESTAMP,
        expires_at=_TIMESTAMP,
        payment={
            "oneOf": [
                {"type": "null"},
                _object(["status"], provider={"type": "string"}, status={"type": "string"}),
            ]
        },
        lines={"type": "array", "items": {"type": "object"}},
        timeline={
            "type": "array",
            "items": _object(["at", "kind"], kind={"enum": ["event", "transition", "movement"]}),
        },
    ),
    "Return": _object(["lines"], lines={"type": "array", "items": ref("Line"), "minItems": 1}),
    "Event": _object(
        ["id", "provider", "event_key", "type", "status"],
        id={"type": "integer"},
        provider={"type": "string"},
        event_key={"type": "string"},
        type=_nullable("string"),
        status={"type": "string"},
        attempts={"type": "integer"},
        last_error=_nullable("string"),
        received_at=_TIMESTAMP,
        published_at=_TIMESTAMP,
        processed_at=_TIMESTAMP,
    ),
    "Run": _object(
        ["id", "job", "trigger", "state", "counts"],
        id={"type": "integer"},
        job={"type": "string"},
        slot=_TIMESTAMP,
        trigger={"enum": ["scheduled", "manual"]},
        state={"enum": ["queued", "running", "succeeded", "failed", "skipped"]},
        counts={"type": "object"},
        error=_nullable("string"),
        attempts={"type": "integer"},
        created_at=_TIMESTAMP,
        started_at=_TIMESTAMP,
        finished_at=_TIMESTAMP,
        duration_seconds=_nullable("number"),
    ),
    "Job": _object(
        ["name", "cron", "time_zone", "follows_real_time", "catch_up_seconds", "next_run", "last_run"],
        name={"type": "string"},
        cron={"type": "string"},
        time_zone={"type": "string"},
        follows_real_time={"type": "boolean"},
        catch_up_seconds={"type": "integer"},
        next_run=_object(["local", "utc"], local=_TIMESTAMP, utc=_TIMESTAMP),
        last_run={"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Run"}]},
    ),
    "Readiness": _object(
        ["ready", "checks"],
        ready={"type": "boolean"},
        checks=_object(
            ["postgresql", "rabbitmq"], postgresql={"type": "string"}, rabbitmq={"type": "string"}
        ),
    ),
}


def _limit(most: int = 500) -> Schema:
    return {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": most, "default": 50},
    }


def _query(name: str, schema: Schema, description: str = "") -> Schema:
    return {"name": name, "in": "query", "schema": schema, "description": description}


def _path(name: str, schema: Schema | None = None) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema or {"type": "string"}}


def _body(schema: Schema, media: str = JSON) -> Schema:
    return {"required": True, "content": {media: {"schema": schema}}}


def op(
    summary: str, responses: dict[str, Schema], *, admin: bool = False, db: bool = True, **more: Any
) -> Schema:
    """One operation; an admin one gets the bearer scheme and its 401, and
    one that reads PostgreSQL may meet it down (503)."""
    answers = dict(responses)
    if admin:
        answers.setdefault("401", UNAUTHORIZED)
    if db:
        answers.setdefault("503", UNAVAILABLE)
    operation: Schema = {"summary": summary, "responses": answers, **more}
    if admin:
        operation["security"] = [{"admin": []}]
    return operation


def _webhook_paths() -> dict[str, Schema]:
    stripe = op(
        "A Stripe event, verified by its Stripe-Signature, stored and committed before the answer",
        {
            "200": _json(
                _object(["received", "duplicate"], received={"const": True}, duplicate={"type": "boolean"}),
                "stored (or already stored: duplicate)",
            ),
            "400": _error("missing or bad signature, stale or future timestamp, malformed body"),
            "413": TOO_LARGE,
            "503": UNAVAILABLE,
        },
        parameters=[{"name": "Stripe-Signature", "in": "header", "schema": {"type": "string"}}],
        requestBody=_body({"type": "object"}),
    )
    monetbil = op(
        "Monetbil's payment callback, verified by its `sign` field",
        {
            "200": {
                "description": "stored (also for a duplicate)",
                "content": {"text/plain": {"schema": {"const": "received"}}},
            },
            "400": _error("malformed: not a form, a repeated field, no transaction_id or status"),
            "403": _error("missing or bad sign"),
            "413": TOO_LARGE,
            "503": UNAVAILABLE,
        },
        requestBody=_body(
            _object(
                ["sign"],
                transaction_id={"type": "string"},
                status={"type": "string"},
                payment_ref={"type": "string"},
                sign={"type": "string"},
            ),
            "application/x-www-form-urlencoded",
        ),
    )
    return {"/webhooks/stripe": {"post": stripe}, "/webhooks/monetbil": {"post": monetbil}}


def _shop_paths() -> dict[str, Schema]:
    cart_id = [_path("cart_id")]
    return {
        "/checkout": {
            "post": op(
                "Place an order and start its payment; the stock is reserved",
                {
                    "201": _json(ref("CheckoutAnswer"), "the order, pending payment"),
                    "400": BAD_INPUT,
                    "409": _error("insufficient_stock (with sku, available) or a cart already checked out"),
                    "410": _error("the cart expired"),
                    "413": TOO_LARGE,
                    "502": _error("the provider failed; nothing stays reserved"),
                    "503": UNAVAILABLE,
                },
                requestBody=_body(ref("Checkout")),
            )
        },
        "/carts": {
            "post": op("A new, empty cart", {"201": _json(ref("Cart"), "the cart"), "503": UNAVAILABLE})
        },
        "/carts/{cart_id}": {
            "get": op(
                "A cart with its lines and prices",
                {
                    "200": _json(ref("Cart"), "the cart"),
                    "404": NOT_FOUND,
                    "410": _error("expired"),
                    "503": UNAVAILABLE,
                },
                parameters=cart_id,
            )
        },
        "/carts/{cart_id}/items": {
            "put": op(
                "Set one line (quantity 0 removes it)",
                {
                    "200": _json(ref("Cart"), "the cart"),
                    "400": BAD_INPUT,
                    "404": NOT_FOUND,
                    "409": _error("the cart was already checked out"),
                    "410": _error("expired"),
                    "413": TOO_LARGE,
                    "503": UNAVAILABLE,
                },
                parameters=cart_id,
                requestBody=_body(ref("Line")),
            )
        },
    }


def _product_paths() -> dict[str, Schema]:
    sku = [_path("sku")]
    return {
        "/admin/products": {
            "get": op(
                "Products, optionally only the low (or not low) ones",
                {"200": _json(_list_of("products", ref("Product")), "products"), "400": BAD_INPUT},
                admin=True,
                parameters=[_query("low_stock", {"type": "boolean"}), _limit()],
            )
        },
        "/admin/products/{sku}": {
            "put": op(
                "Create or update; a change of on_hand writes a restock or adjustment movement",
                {
                    "200": _json(ref("Product"), "updated"),
                    "201": _json(ref("Product"), "created"),
                    "400": BAD_INPUT,
                    "409": _error("on_hand below the reserved units"),
                    "413": TOO_LARGE,
                },
                admin=True,
                parameters=sku,
                requestBody=_body(ref("PutProduct")),
            ),
            "get": op(
                "A product's stock",
                {"200": _json(ref("Product"), "the product"), "400": BAD_INPUT, "404": NOT_FOUND},
                admin=True,
                parameters=sku,
            ),
        },
        "/admin/products/{sku}/movements": {
            "get": op(
                "The stock ledger, newest first; pass next_before as before for the next page",
                {
                    "200": _json(
                        _object(
                            ["movements", "next_before"],
                            movements={"type": "array", "items": ref("Movement")},
                            next_before=_nullable("integer"),
                        ),
                        "a page",
                    ),
                    "400": BAD_INPUT,
                    "404": NOT_FOUND,
                },
                admin=True,
                parameters=[*sku, _limit(), _query("before", {"type": "integer", "minimum": 1})],
            )
        },
        "/admin/reservations/stats": {
            "get": op(
                "Active reservations",
                {
                    "200": _json(
                        _object(
                            ["active_reservations", "units_reserved", "oldest_active_age_seconds"],
                            active_reservations={"type": "integer"},
                            units_reserved={"type": "object", "additionalProperties": {"type": "integer"}},
                            oldest_active_age_seconds=_nullable("number"),
                        ),
                        "counts",
                    )
                },
                admin=True,
            )
        },
    }


def _order_paths() -> dict[str, Schema]:
    order_id = [_path("order_id")]
    order = _json(ref("Order"), "the order")
    paths: dict[str, Schema] = {
        "/admin/orders": {
            "get": op(
                "Orders, newest first",
                {"200": _json(_list_of("orders", ref("OrderSummary")), "orders"), "400": BAD_INPUT},
                admin=True,
                parameters=[_query("status", {"type": "string"}, "e.g. needs_attention"), _limit()],
            )
        },
        "/admin/orders/{order_id}": {
            "get": op(
                "The order, its payment, lines and timeline",
                {"200": order, "404": NOT_FOUND},
                admin=True,
                parameters=order_id,
            )
        },
    }
    for action, summary in (("ready-for-pickup", "paid → ready_for_pickup"), ("complete", "→ completed")):
        paths[f"/admin/orders/{{order_id}}/{action}"] = {
            "post": op(
                f"{summary}; a repeat is a no-op",
                {"200": order, "404": NOT_FOUND, "409": CONFLICT},
                admin=True,
                parameters=order_id,
            )
        }
    paths["/admin/orders/{order_id}/return"] = {
        "post": op(
            "Goods back: a return movement per line, never more than sold",
            {"200": order, "400": BAD_INPUT, "404": NOT_FOUND, "409": CONFLICT, "413": TOO_LARGE},
            admin=True,
            parameters=order_id,
            requestBody=_body(ref("Return")),
        )
    }
    return paths


def _event_paths() -> dict[str, Schema]:
    return {
        "/admin/events": {
            "get": op(
                "Stored provider events, newest first",
                {"200": _json(_list_of("events", ref("Event")), "events"), "400": BAD_INPUT},
                admin=True,
                parameters=[
                    _query("provider", {"type": "string"}),
                    _query("status", {"type": "string"}),
                    _limit(),
                ],
            )
        },
        "/admin/events/{event_id}": {
            "get": op(
                "One stored event and the payment it was applied to",
                {
                    "200": _json(
                        {"allOf": [ref("Event"), _object(payment_id=_nullable("string"))]}, "the event"
                    ),
                    "400": BAD_INPUT,
                    "404": NOT_FOUND,
                },
                admin=True,
                parameters=[_path("event_id", {"type": "integer"})],
            )
        },
        "/admin/events/replay": {
            "post": op(
                "Reopen and publish again every event a filter selects (a status is required)",
                {
                    "200": _json(
                        _object(
                            ["count", "ids", "dry_run"],
                            count={"type": "integer"},
                            ids={"type": "array", "items": {"type": "integer"}},
                            dry_run={"const": True},
                        ),
                        "dry_run: the ids that would be replayed; nothing changed",
                    ),
                    "202": _json(
                        _object(
                            ["count", "published"], count={"type": "integer"}, published={"type": "integer"}
                        ),
                        "reopened and published (the relay publishes what could not be)",
                    ),
                    "400": BAD_INPUT,
                    "413": TOO_LARGE,
                },
                admin=True,
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["status"],
                        "additionalProperties": False,
                        "properties": {
                            "status": {"enum": ["failed", "unmatched", "ignored"]},
                            "provider": {"type": "string"},
                            "type": {"type": "string", "minLength": 1, "maxLength": 128},
                            "since": {"type": "string", "format": "date-time"},
                            "until": {"type": "string", "format": "date-time"},
                            "dry_run": {"type": "boolean"},
                        },
                    }
                ),
            )
        },
        "/admin/events/{event_id}/replay": {
            "post": op(
                "Reopen an unmatched, failed or ignored event and publish it again",
                {
                    "202": _json(
                        _object(
                            ["id", "status", "published"],
                            id={"type": "integer"},
                            status={"type": "string"},
                            published={"type": "boolean"},
                        ),
                        "reopened",
                    ),
                    "400": BAD_INPUT,
                    "404": NOT_FOUND,
                    "409": _error("the event is processed"),
                },
                admin=True,
                parameters=[_path("event_id", {"type": "integer"})],
            )
        },
    }


def _job_paths() -> dict[str, Schema]:
    return {
        "/admin/jobs": {
            "get": op(
                "The job table with next and last runs",
                {"200": _json(_list_of("jobs", ref("Job")), "jobs")},
                admin=True,
            )
        },
        "/admin/jobs/runs": {
            "get": op(
                "Runs, newest first",
                {"200": _json(_list_of("runs", ref("Run")), "runs"), "400": BAD_INPUT},
                admin=True,
                parameters=[_query("job", {"type": "string"}), _limit()],
            )
        },
        "/admin/jobs/metrics": {
            "get": op(
                "Figures from the run records, fleet-wide",
                {
                    "200": _json(
                        _object(
                            ["paymentsExpiredTotal", "paymentIntentsCanceledTotal", "stockReleasedTotal"],
                            paymentsExpiredTotal={"type": "integer"},
                            paymentIntentsCanceledTotal={"type": "integer"},
                            stockReleasedTotal={"type": "integer"},
                            jobExecutionTime={"type": "object", "additionalProperties": {"type": "number"}},
                            lastExecutionTime={"type": "object", "additionalProperties": _TIMESTAMP},
                        ),
                        "figures",
                    )
                },
                admin=True,
            )
        },
        "/admin/jobs/{name}/run": {
            "post": op(
                "Start a run by hand",
                {
                    "202": _json(
                        _object(
                            ["run_id", "job", "state", "published"],
                            run_id={"type": "integer"},
                            job={"type": "string"},
                            state={"const": "queued"},
                            published={"type": "boolean"},
                        ),
                        "queued",
                    ),
                    "404": NOT_FOUND,
                },
                admin=True,
                parameters=[_path("name")],
            )
        },
    }


def _routing_paths() -> dict[str, Schema]:
    rules = _json({"type": "object"}, "the rules")
    return {
        "/admin/routing": {
            "get": op("The provider routing rules", {"200": rules}, admin=True),
            "put": op(
                "Replace the whole ordered list of rules",
                {"200": rules, "400": BAD_INPUT, "413": TOO_LARGE},
                admin=True,
                requestBody=_body(_object(["rules"], rules={"type": "array", "items": {"type": "object"}})),
            ),
        },
        "/admin/routing/history": {
            "get": op(
                "Changes to the rules, newest first",
                {"200": _json(_list_of("changes", {"type": "object"}), "changes"), "400": BAD_INPUT},
                admin=True,
                parameters=[_limit()],
            )
        },
        "/admin/routing/providers": {
            "get": op(
                "Each provider's capabilities and circuit",
                {"200": _json({"type": "object"}, "providers")},
                admin=True,
            )
        },
        "/admin/routing/explain": {
            "post": op(
                "Which providers a checkout would try, and why; creates nothing",
                {"200": _json({"type": "object"}, "the route"), "400": BAD_INPUT, "413": TOO_LARGE},
                admin=True,
                requestBody=_body(
                    _object(
                        ["currency"],
                        currency={"type": "string"},
                        country={"type": "string"},
                        amount={"type": "integer", "minimum": 0},
                    )
                ),
            )
        },
    }


def _health_paths() -> dict[str, Schema]:
    return {
        "/healthz": {
            "get": op(
                "Liveness", {"200": _json(_object(["status"], status={"const": "ok"}), "alive")}, db=False
            )
        },
        "/readyz": {
            "get": op(
                "PostgreSQL and RabbitMQ reachable (answers cached briefly, checks bounded in time)",
                {"200": _json(ref("Readiness"), "ready"), "503": _json(ref("Readiness"), "not ready")},
                db=False,
            )
        },
        "/metrics": {
            "get": op(
                "Prometheus metrics",
                {
                    "200": {
                        "description": "the exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                db=False,
            )
        },
        "/openapi.json": {
            "get": op("This document", {"200": _json({"type": "object"}, "OpenAPI 3.1")}, db=False),
        },
    }


def _document() -> Schema:
    paths: dict[str, Schema] = {}
    for part in (
        _webhook_paths,
        _shop_paths,
        _product_paths,
        _order_paths,
        _event_paths,
        _job_paths,
        _routing_paths,
        _health_paths,
    ):
        paths.update(part())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "payfleet ingress",
            "version": "1",
            "description": "Provider webhooks, checkout and carts, the admin API, health and metrics. "
            'Errors are {"error": code, "detail": text}; money is in integer minor units.',
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "admin": {"type": "http", "scheme": "bearer", "description": "ADMIN_TOKEN"},
            },
        },
    }


DOCUMENT = _document()


class OpenApi:
    """Serves DOCUMENT; no admin token needed, it holds no secret."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = DOCUMENT
