"""The routing admin routes under mutated input: never a 5xx, a refused
rule list changes nothing, an accepted one is exactly what is then in force
(and routes checkouts without error)."""

from __future__ import annotations

from typing import Any

from falcon import testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import scalar
from tests.fuzz.nasty import FUZZ, examples, mutated
from tests.support.shop import ADMIN

RULES = {
    "rules": [
        {
            "name": "cm-mobile-money",
            "match": {"currency": ["XAF", "XOF"], "country": ["CM"], "min_amount": 100, "max_amount": 500000},
            "providers": ["monetbil", "stripe"],
        },
        {"name": "eur", "match": {"currency": ["EUR"]}, "providers": ["stripe"]},
    ]
}
EXPLAIN = {"currency": "XAF", "country": "CM", "amount": 2500}
JSON = {**ADMIN, "Content-Type": "application/json"}


@settings(FUZZ, max_examples=examples(120))
@given(body=mutated(RULES))
def test_put_routing_with_mutated_rules(client: testing.TestClient, sessions: Any, body: bytes) -> None:
    versions = scalar(sessions, "SELECT count(*) FROM routing_rule_sets")
    before = client.simulate_get("/admin/routing", headers=ADMIN).json["rules"]

    answer = client.simulate_put("/admin/routing", body=body, headers=JSON)

    assert answer.status_code in (200, 400), answer.text
    now = client.simulate_get("/admin/routing", headers=ADMIN).json["rules"]
    if answer.status_code == 400:
        assert answer.json["error"] in ("invalid_request", "malformed_body"), answer.json
        assert now == before
        assert scalar(sessions, "SELECT count(*) FROM routing_rule_sets") == versions
        return
    assert now == answer.json["rules"]
    for currency in ("XAF", "EUR"):
        explained = client.simulate_post(
            "/admin/routing/explain",
            json={"currency": currency, "country": "CM", "amount": 2500},
            headers=ADMIN,
        )
        assert explained.status_code == 200, explained.text


@settings(FUZZ, max_examples=examples(120))
@given(body=mutated(EXPLAIN), rules=st.sampled_from([[], RULES["rules"]]))
def test_explain_with_mutated_input(
    client: testing.TestClient, sessions: Any, body: bytes, rules: list[Any]
) -> None:
    assert client.simulate_put("/admin/routing", json={"rules": rules}, headers=ADMIN).status_code == 200

    answer = client.simulate_post("/admin/routing/explain", body=body, headers=JSON)

    assert answer.status_code in (200, 400), answer.text
    if answer.status_code == 200:
        assert set(answer.json) == {"providers", "rule", "steps"}
    assert scalar(sessions, "SELECT count(*) FROM orders") == 0
