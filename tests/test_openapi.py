"""GET /openapi.json: a valid OpenAPI 3.1 document that describes every route
the app registers, and that a live ingress (real gunicorn, the test database
and vhost) answers as described, checked by schemathesis with cases it
generates from the document itself."""

from __future__ import annotations

import json
import re
from typing import Any

import falcon
import hypothesis
import requests
import schemathesis
from openapi_spec_validator import validate
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ingress.openapi import DOCUMENT
from tests.conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
METHODS = ("get", "put", "post", "delete", "patch")
# Examples per operation; about forty operations against one gunicorn.
EXAMPLES = 15


def test_the_document_is_valid_openapi_3_1():
    validate(DOCUMENT)
    assert DOCUMENT["openapi"].startswith("3.1")


def test_the_app_serves_it_without_the_admin_token(client):
    answer = client.simulate_get("/openapi.json")
    assert answer.status_code == 200
    assert answer.json == json.loads(json.dumps(DOCUMENT))


def _registered(app: falcon.App[Any, Any]) -> set[tuple[str, str]]:
    """(path, method) of every responder a resource defines, read from the
    router; Falcon's own 405 and OPTIONS responders are left out."""
    found: set[tuple[str, str]] = set()
    nodes = list(app._router._roots)
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        for method, responder in (node.method_map or {}).items():
            if getattr(responder, "__self__", None) is node.resource:
                path = re.sub(r"\{(\w+):\w+\}", r"{\1}", str(node.uri_template))
                found.add((path, method.lower()))
    return found


def _described() -> set[tuple[str, str]]:
    return {
        (path, method) for path, item in DOCUMENT["paths"].items() for method in item if method in METHODS
    }


def test_every_registered_route_is_described_and_nothing_else(client):
    registered = _registered(client.app)
    assert registered, "the router walk found no routes"
    assert registered - _described() == set(), "routes the document does not describe"
    assert _described() - registered == set(), "described routes the app does not have"


def test_admin_operations_declare_the_bearer_scheme():
    assert DOCUMENT["components"]["securitySchemes"]["admin"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "ADMIN_TOKEN",
    }
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            admin = path.startswith("/admin")
            assert (operation.get("security") == [{"admin": []}]) is admin, (method, path)
            assert ("401" in operation["responses"]) is admin, (method, path)


def _seed(base: str) -> None:
    """Rows for the list answers to show: a product, an order with its
    payment (through the fake Stripe), a queued job run."""
    product = {"name": "Mug", "price": 1200, "currency": "EUR", "on_hand": 5, "low_stock_threshold": 1}
    assert (
        requests.put(f"{base}/admin/products/MUG", json=product, headers=ADMIN, timeout=10).status_code == 201
    )
    order = {"items": [{"sku": "MUG", "quantity": 1}], "provider": "stripe", "currency": "EUR"}
    assert requests.post(f"{base}/checkout", json=order, timeout=10).status_code == 201
    run = requests.post(f"{base}/admin/jobs/clean-expired-carts/run", headers=ADMIN, timeout=10)
    assert run.status_code == 202


def test_the_live_ingress_answers_as_described(ingress):
    _seed(ingress)
    schema = schemathesis.openapi.from_url(f"{ingress}/openapi.json")
    checks = [
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        ignored_auth,
    ]
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    # schemathesis leaves out the operation that serves the document it loaded.
    assert {operation.label for operation in operations} == {
        f"{method.upper()} {path}" for path, method in _described()
    } - {"GET /openapi.json"}
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        def conforms(case: Any) -> None:
            case.call_and_validate(base_url=ingress, headers=ADMIN, checks=checks, timeout=10)

        try:
            conforms()
        # Every operation is tried and the failures shown together
        # (schemathesis raises a FailureGroup, a BaseExceptionGroup).
        except (Exception, BaseExceptionGroup) as error:
            failures[operation.label] = f"{type(error).__name__}: {error}"[:2000]
    assert not failures, "\n\n".join(f"{label}\n{text}" for label, text in failures.items())
