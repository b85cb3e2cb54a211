"""Payment routing: rule matching and ordering, the default, validation of
the operator's rules (400 naming the rule, nothing changed), the history,
and explain, which says what checkout then does and creates nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from domain.gateways import MonetbilApiGateway, MonetbilLinks, StripeApiGateway, payment_providers
from domain.routing import Match, Route, Rule, parse_rules, resolve
from tests.conftest import scalar
from tests.support.shop import ADMIN, auto_checkout, order, put_product, put_routing

# The real providers; resolving never calls them.
PROVIDERS = payment_providers(
    StripeApiGateway("sk_test_unused", "http://127.0.0.1:9"),
    MonetbilApiGateway("svc_unused", "http://127.0.0.1:9"),
    MonetbilLinks("http://shop.test/webhooks/monetbil", "http://shop.test/"),
)


def rule(name: str, *providers: str, **match: Any) -> dict[str, Any]:
    return {"name": name, "match": match, "providers": list(providers)}


RULES = [
    rule("cm-big", "stripe", "monetbil", currency=["XAF"], country=["CM"], min_amount=100_000),
    rule("cm-mobile-money", "monetbil", "stripe", currency=["XAF", "XOF"], country=["CM", "SN"]),
    rule("xaf-elsewhere", "stripe", currency=["XAF"]),
    rule("small", "monetbil", "stripe", max_amount=999),
]


def _route(rules: Any, currency: str, country: str | None, amount: int, open_circuits: Any = None) -> Route:
    parsed = parse_rules(rules, PROVIDERS)
    return resolve(parsed, PROVIDERS, open_circuits or {}, currency=currency, country=country, amount=amount)


@pytest.mark.parametrize(
    ("currency", "country", "amount", "rule", "providers"),
    [
        ("XAF", "CM", 150_000, "cm-big", ("stripe", "monetbil")),  # the first match wins
        ("XAF", "CM", 2_500, "cm-mobile-money", ("monetbil", "stripe")),  # under cm-big's minimum
        ("XOF", "SN", 2_500, "cm-mobile-money", ("monetbil", "stripe")),
        ("XAF", "GA", 2_500, "xaf-elsewhere", ("stripe",)),  # a country no earlier rule names
        ("XAF", None, 150_000, "xaf-elsewhere", ("stripe",)),  # no country: no rule naming countries fits
        ("EUR", "FR", 500, "small", ("stripe",)),  # Monetbil cannot take EUR: skipped
        ("EUR", "FR", 5_000, None, ("stripe",)),  # above small's maximum: the default
        ("XOF", "CI", 2_500, None, ("monetbil",)),  # no rule fits: the default
    ],
)
def test_the_first_matching_rule_orders_the_providers(currency, country, amount, rule, providers):
    route = _route(RULES, currency, country, amount)

    assert (route.rule, route.providers) == (rule, providers), route.steps


def test_without_rules_xaf_and_xof_go_to_monetbil_and_the_rest_to_stripe():
    assert _route([], "XAF", "CM", 2500).providers == ("monetbil",)
    assert _route([], "XOF", None, 2500).providers == ("monetbil",)
    for currency in ("EUR", "USD", "JPY"):
        route = _route([], currency, None, 2500)
        assert (route.rule, route.providers) == (None, ("stripe",))
    assert _route([], "XAF", "CM", 2500).steps[0] == "no routing rules set: default routing, XAF to monetbil"


def test_the_steps_say_why_each_rule_and_provider_was_passed_over():
    until = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    route = _route(RULES, "XAF", "CM", 150_000, {"stripe": until})

    assert route.providers == ("monetbil",)
    assert route.steps == (
        "rule 'cm-big' matched: currency XAF in [XAF], country CM in [CM], amount 150000 at least 100000",
        "stripe skipped: circuit open until 2026-11-30T12:00:00+00:00",
        "providers in order: monetbil",
    )
    assert _route(RULES, "EUR", "FR", 500).steps[:4] == (
        "rule 'cm-big' skipped: currency EUR not in [XAF]",
        "rule 'cm-mobile-money' skipped: currency EUR not in [XAF, XOF]",
        "rule 'xaf-elsewhere' skipped: currency EUR not in [XAF]",
        "rule 'small' matched: amount 500 at most 999",
    )


def test_an_unconfigured_provider_is_skipped():
    providers = payment_providers(
        StripeApiGateway("", "http://127.0.0.1:9"),
        MonetbilApiGateway("svc", "http://127.0.0.1:9"),
        MonetbilLinks("n", "r"),
    )
    rules = [Rule("any", Match(), ("stripe", "monetbil"))]
    route = resolve(rules, providers, {}, currency="XAF", country=None, amount=10)

    assert route.providers == ("monetbil",)
    assert route.skipped == (("stripe", "not configured (STRIPE_API_KEY is empty)"),)


def _rule(**changes: Any) -> dict[str, Any]:
    return {"name": "r1", "match": {"currency": ["XAF"]}, "providers": ["monetbil"]} | changes


UNKNOWN_MATCH = {"currency": ["XAF"], "amount": 5}
BAD_RULE_LISTS = [
    ([_rule(providers=["paypal"])], "rule 'r1': unknown provider 'paypal'"),
    ([_rule(match={"currency": ["EUR"]})], "rule 'r1': monetbil cannot take EUR"),
    ([_rule(match={"country": ["FR"]})], "rule 'r1': monetbil cannot take payments from FR"),
    ([_rule(providers=[])], "rule 'r1': 'providers' must list at least one provider"),
    ([_rule(providers="monetbil")], "rule 'r1': 'providers' must list"),
    ([_rule(providers=["monetbil", "monetbil"])], "rule 'r1': a provider is listed twice"),
    ([_rule(), _rule()], "rule 'r1': the name is used twice"),
    ([_rule(), {"match": {}, "providers": ["stripe"]}], "rule #2: 'name'"),
    ([_rule(name="")], "rule #1: 'name'"),
    (["stripe"], "rule #1 must be an object"),
    ([_rule(match={"currency": ["EURO"]})], "rule 'r1': 'EURO' is not a 3-letter currency code"),
    ([_rule(match={"currency": []})], "rule 'r1': 'currency' must be a non-empty list"),
    ([_rule(match={"country": ["CMR"]})], "rule 'r1': 'CMR' is not a 2-letter country code"),
    ([_rule(match={"min_amount": -1})], "rule 'r1': 'min_amount' must be a whole number"),
    ([_rule(match={"max_amount": 1.5})], "rule 'r1': 'max_amount' must be a whole number"),
    ([_rule(match={"min_amount": True})], "rule 'r1': 'min_amount' must be a whole number"),
    ([_rule(match={"min_amount": 10, "max_amount": 5})], "rule 'r1': min_amount 10 is above max_amount 5"),
    ([_rule(match=UNKNOWN_MATCH)], "rule 'r1': 'match' has unknown keys ['amount']"),
    ([_rule(weight=2)], "rule 'r1': a rule has unknown keys ['weight']"),
    ([_rule(match=["XAF"])], "rule 'r1': 'match' must be an object"),
    ({"r1": _rule()}, "'rules' must be a list"),
]


@pytest.mark.parametrize(
    ("rules", "said"), BAD_RULE_LISTS, ids=[said.split(": ")[-1][:30] for _, said in BAD_RULE_LISTS]
)
def test_a_bad_rule_list_is_refused_naming_the_rule_and_changes_nothing(client, sessions, rules, said):
    assert put_routing(client, [_rule(name="kept")]).status_code == 200

    answer = client.simulate_put("/admin/routing", json={"rules": rules}, headers=ADMIN)

    assert (answer.status_code, answer.json["error"]) == (400, "invalid_request"), answer.text
    assert answer.json["detail"].startswith(said), answer.json
    assert [r["name"] for r in client.simulate_get("/admin/routing", headers=ADMIN).json["rules"]] == ["kept"]
    assert scalar(sessions, "SELECT count(*) FROM routing_rule_sets") == 1


@pytest.mark.parametrize(
    "body", [{}, {"rules": [], "extra": 1}, [], "rules"], ids=["empty", "extra-key", "list", "string"]
)
def test_a_put_whose_body_is_not_a_rule_list_is_refused(client, sessions, body):
    answer = client.simulate_put("/admin/routing", json=body, headers=ADMIN)

    assert answer.status_code == 400, answer.text
    assert scalar(sessions, "SELECT count(*) FROM routing_rule_sets") == 0


def test_the_routing_routes_need_the_admin_token(client, sessions):
    routes = [
        ("GET", "/admin/routing"),
        ("PUT", "/admin/routing"),
        ("GET", "/admin/routing/history"),
        ("POST", "/admin/routing/explain"),
        ("GET", "/admin/routing/providers"),
    ]
    for method, path in routes:
        answer = client.simulate_request(method, path, json={"rules": []})
        assert answer.status_code == 401, (method, path)
    assert scalar(sessions, "SELECT count(*) FROM routing_rule_sets") == 0


def test_rules_are_replaced_whole_and_every_change_is_in_the_history(client):
    assert client.simulate_get("/admin/routing", headers=ADMIN).json["rules"] == []
    first = put_routing(client, RULES)
    assert first.status_code == 200, first.text
    # Codes are stored upper-cased; absent match keys stay absent.
    second = put_routing(
        client, [{"name": "only", "match": {"currency": ["xof"]}, "providers": ["monetbil"]}]
    )
    assert second.status_code == 200, second.text

    rules = client.simulate_get("/admin/routing", headers=ADMIN).json["rules"]
    history = client.simulate_get("/admin/routing/history", headers=ADMIN).json["changes"]

    assert rules == [{"name": "only", "match": {"currency": ["XOF"]}, "providers": ["monetbil"]}]
    assert [change["rules"] for change in history] == [rules, RULES]
    newest, older = (datetime.fromisoformat(change["changed_at"]) for change in history)
    assert older <= newest <= datetime.now(UTC) + timedelta(seconds=1)
    assert (
        client.simulate_get("/admin/routing/history?limit=1", headers=ADMIN).json["changes"][0]["rules"]
        == rules
    )


def test_checkout_without_a_provider_follows_the_default(client, fake_stripe, fake_monetbil, sessions):
    put_product(client, "TEE", on_hand=5)
    put_product(client, "PAGNE", on_hand=5, price=2500, currency="XAF")

    eur = auto_checkout(client, ("TEE", 1), currency="EUR")
    xaf = auto_checkout(client, ("PAGNE", 1), currency="XAF", country="CM")

    assert eur.status_code == xaf.status_code == 201, (eur.text, xaf.text)
    assert (eur.json["payment"]["provider"], eur.json["routing"]["rule"]) == ("stripe", None)
    assert eur.json["payment"]["client_secret"]
    assert (xaf.json["payment"]["provider"], xaf.json["routing"]["rule"]) == ("monetbil", None)
    assert xaf.json["payment"]["payment_url"].startswith(fake_monetbil.base_url)
    assert xaf.json["routing"]["tried"] == [{"provider": "monetbil", "outcome": "started"}]
    timeline = order(client, xaf.json["order_id"])["timeline"]
    assert any(entry.get("reason") == "routing: default routing; monetbil started" for entry in timeline), (
        timeline
    )


def test_an_explicit_provider_still_forces_that_one(client, fake_stripe, fake_monetbil):
    put_product(client, "PAGNE", on_hand=5, price=2500, currency="XAF")
    assert put_routing(client, [{"name": "mm", "match": {}, "providers": ["monetbil"]}]).status_code == 200
    body = {"items": [{"sku": "PAGNE", "quantity": 1}], "currency": "XAF", "provider": "stripe"}

    answer = client.simulate_post("/checkout", json=body)

    assert answer.status_code == 201, answer.text
    assert answer.json["payment"]["provider"] == "stripe" and "routing" not in answer.json
    assert fake_monetbil.requests == []


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"provider": "auto", "country": "CMR"}, "country must be a 2-letter ISO country code, got 'CMR'"),
        ({"provider": "auto", "country": 12}, "'country' must be a str"),
        ({"provider": "monetbil", "country": "FR"}, "monetbil does not take payments from FR"),
        (
            {"provider": "paypal"},
            "provider 'paypal' is not supported; use one of 'auto', 'monetbil', 'stripe'",
        ),
        ({"provider": None}, "'provider' must be a str"),
    ],
)
def test_bad_routing_input_at_checkout_is_refused_and_reserves_nothing(
    client, fake_monetbil, sessions, body, said
):
    put_product(client, "PAGNE", on_hand=5, price=2500, currency="XAF")
    full = {"items": [{"sku": "PAGNE", "quantity": 1}], "currency": "XAF", **body}

    answer = client.simulate_post("/checkout", json=full)

    assert (answer.status_code, answer.json["detail"]) == (400, said), answer.text
    assert scalar(sessions, "SELECT count(*) FROM orders") == 0
    assert scalar(sessions, "SELECT reserved FROM products WHERE sku = 'PAGNE'") == 0


EXPLAIN_RULES = [
    rule(
        "cm-mobile-money", "monetbil", "stripe", currency=["XAF", "XOF"], country=["CM"], max_amount=500_000
    ),
    rule("cm-large", "stripe", "monetbil", currency=["XAF"], country=["CM"]),
    rule("sn", "stripe", "monetbil", country=["SN"]),
    rule("eur-cards", "stripe", currency=["EUR"]),
]

# (currency, country, unit price, quantity); every rule, and the default, is met.
EXPLAIN_CASES = [
    ("XAF", "CM", 2_500, 1),  # cm-mobile-money
    ("XAF", "CM", 300_000, 2),  # above its maximum: cm-large
    ("XOF", "SN", 1_000, 3),  # sn: stripe first
    ("EUR", None, 1_500, 1),  # eur-cards
    ("XOF", "CI", 1_000, 1),  # no rule: the default
    ("USD", "US", 999, 1),  # no rule: the default
]


SKIPPED = ("stripe skipped", "monetbil skipped")


def _counts(sessions: Any) -> Any:
    with sessions() as session:
        return session.execute(
            text(
                "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM payments),"
                " (SELECT count(*) FROM stock_reservations),"
                " (SELECT coalesce(sum(reserved), 0) FROM products),"
                " (SELECT count(*) FROM routing_rule_sets), (SELECT count(*) FROM provider_circuits)"
            )
        ).one()


def test_explain_agrees_with_what_checkout_then_does_for_every_rule(
    client, fake_stripe, fake_monetbil, sessions
):
    assert put_routing(client, EXPLAIN_RULES).status_code == 200
    for index, (currency, _, price, _) in enumerate(EXPLAIN_CASES):
        put_product(client, f"SKU-{index}", on_hand=10, price=price, currency=currency)
    seen_rules = set()
    for index, (currency, country, price, quantity) in enumerate(EXPLAIN_CASES):
        before = _counts(sessions)
        explained = client.simulate_post(
            "/admin/routing/explain",
            json={"currency": currency, "country": country, "amount": price * quantity},
            headers=ADMIN,
        )
        assert explained.status_code == 200, explained.text
        assert _counts(sessions) == before, "explain created something"

        answer = auto_checkout(client, (f"SKU-{index}", quantity), currency=currency, country=country)

        assert answer.status_code == 201, answer.text
        routing = answer.json["routing"]
        assert routing["rule"] == explained.json["rule"]
        assert routing["tried"][0]["provider"] == explained.json["providers"][0]
        assert answer.json["payment"]["provider"] == explained.json["providers"][0]
        assert [s["provider"] for s in routing["skipped"]] == [
            step.split(" ")[0]
            for step in explained.json["steps"]
            if " skipped: " in step and "rule" not in step
        ]
        seen_rules.add(explained.json["rule"])
    assert seen_rules == {rule["name"] for rule in EXPLAIN_RULES} | {None}


def test_explain_answers_the_steps(client):
    assert put_routing(client, EXPLAIN_RULES).status_code == 200

    answer = client.simulate_post(
        "/admin/routing/explain", json={"currency": "xaf", "country": "cm", "amount": 2500}, headers=ADMIN
    )

    assert answer.status_code == 200, answer.text
    assert answer.json == {
        "providers": ["monetbil", "stripe"],
        "rule": "cm-mobile-money",
        "steps": [
            "rule 'cm-mobile-money' matched: currency XAF in [XAF, XOF], country CM in [CM],"
            " amount 2500 at most 500000",
            "providers in order: monetbil, stripe",
        ],
    }


@pytest.mark.parametrize(
    "body",
    [{}, {"currency": "XAFF"}, {"currency": "XAF", "amount": -1}, {"currency": "XAF", "amount": "1"},
     {"currency": "XAF", "country": "C"}],
)  # fmt: skip
def test_explain_refuses_bad_input(client, body):
    answer = client.simulate_post("/admin/routing/explain", json=body, headers=ADMIN)

    assert (answer.status_code, answer.json["error"]) == (400, "invalid_request"), answer.text


def test_the_providers_route_shows_capabilities_health_and_circuits(client):
    answer = client.simulate_get("/admin/routing/providers", headers=ADMIN)

    assert answer.status_code == 200, answer.text
    providers = {p["name"]: p for p in answer.json["providers"]}
    assert set(providers) == {"stripe", "monetbil"}
    assert {"XAF", "XOF", "EUR", "JPY"} <= set(providers["stripe"]["currencies"])
    assert providers["monetbil"]["currencies"] == ["XAF", "XOF"]
    assert "CM" in providers["monetbil"]["countries"] and providers["stripe"]["countries"] is None
    assert {p["health"] for p in providers.values()} == {"ok"}
    assert {p["circuit"]["open"] for p in providers.values()} == {False}
