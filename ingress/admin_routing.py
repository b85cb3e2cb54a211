"""Admin resources for payment routing: the rules (read, replace), their
history, the providers with their circuits, and explain, which tells where
a payment would go and why without creating anything."""

from __future__ import annotations

import falcon
from sqlalchemy.orm import Session, sessionmaker

from domain import circuit, routing
from domain.errors import InvalidRequest
from ingress.admin import MAX_BODY, AdminResource
from ingress.checkout import Router
from ingress.parsing import json_object, optional, required


class Routing(AdminResource):
    def __init__(self, sessions: sessionmaker[Session], router: Router) -> None:
        self._sessions, self._router = sessions, router

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        with self._sessions() as session:
            rules = routing.rules_in_force(session)
        resp.media = {
            "rules": [rule.as_json() for rule in rules],
            "default": [rule.as_json() for rule in routing.DEFAULT_RULES],
        }

    def on_put(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = json_object(req, MAX_BODY)
        if set(body) != {"rules"}:
            raise InvalidRequest('the body is {"rules": [...]}, the whole ordered list')
        rules = routing.parse_rules(body["rules"], self._router.providers)
        with self._sessions.begin() as session:
            version = routing.replace_rules(session, rules)
            resp.media = {"rules": [rule.as_json() for rule in rules], "version": version.id}

    def on_get_history(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = req.get_param_as_int("limit", min_value=1, max_value=500, default=50)
        with self._sessions() as session:
            resp.media = {"changes": routing.history(session, limit)}

    def on_get_providers(self, req: falcon.Request, resp: falcon.Response) -> None:
        with self._sessions() as session:
            circuits = {state["provider"]: state for state in circuit.circuit_states(session)}
        resp.media = {
            "providers": [
                {
                    "name": name,
                    "currencies": sorted(provider.capabilities.currencies),
                    "countries": sorted(provider.capabilities.countries or ()) or None,
                    "min_amount": provider.capabilities.min_amount,
                    "max_amount": provider.capabilities.max_amount,
                    "health": provider.health() or "ok",
                    "circuit": circuits.get(name, {"open": False, "recent_failures": 0}),
                }
                for name, provider in self._router.providers.items()
            ]
        }

    def on_post_explain(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = json_object(req, MAX_BODY)
        currency = _code(required(body, "currency", str), 3, "currency")
        country = optional(body, "country", str)
        amount = optional(body, "amount", int)
        if amount is not None and not 0 <= amount <= routing.MAX_AMOUNT:
            raise InvalidRequest("'amount' must be a whole number of minor units, 0 or more")
        with self._sessions() as session:
            route = self._router.route(
                session, currency, None if country is None else _code(country, 2, "country"), amount
            )
        resp.media = route.as_json()


def _code(code: str, length: int, name: str) -> str:
    if len(code) != length or not (code.isascii() and code.isalpha()):
        raise InvalidRequest(f"{name!r} must be a {length}-letter ISO code, got {code!r}")
    return code.upper()


def add_routes(
    app: falcon.App[falcon.Request, falcon.Response], sessions: sessionmaker[Session], router: Router
) -> None:
    resource = Routing(sessions, router)
    app.add_route("/admin/routing", resource)
    app.add_route("/admin/routing/history", resource, suffix="history")
    app.add_route("/admin/routing/providers", resource, suffix="providers")
    app.add_route("/admin/routing/explain", resource, suffix="explain")
