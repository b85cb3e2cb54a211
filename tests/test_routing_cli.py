"""`payfleet routing explain|show`: the command prints what
`POST /admin/routing/explain` answers, from the same rules and circuits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import scalar
from tests.support.shop import ADMIN, put_routing

RULES = [
    {"name": "cm-mobile-money", "match": {"currency": ["XAF", "XOF"], "country": ["CM"]},
     "providers": ["monetbil", "stripe"]},
    {"name": "big-xaf", "match": {"currency": ["XAF"], "min_amount": 1_000_000}, "providers": ["stripe"]},
]  # fmt: skip


def payfleet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "payfleet.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_routing_explain_prints_what_the_admin_api_answers(client, env, sessions):
    assert put_routing(client, RULES).status_code == 200
    cases = [("XAF", "CM", 2500), ("XAF", "GA", 2_000_000), ("EUR", None, 1500)]
    for currency, country, amount in cases:
        args = ["routing", "explain", "--currency", currency.lower(), "--amount", str(amount)]
        if country:
            args += ["--country", country]

        printed = payfleet(env, *args)

        assert printed.returncode == 0, printed.stderr
        body = {"currency": currency, "country": country, "amount": amount}
        answered = client.simulate_post("/admin/routing/explain", json=body, headers=ADMIN)
        assert json.loads(printed.stdout) == answered.json
    assert json.loads(payfleet(env, "routing", "explain", "--currency", "XAF", "--country", "CM").stdout) == {
        "providers": ["monetbil", "stripe"],
        "rule": "cm-mobile-money",
        "steps": [
            "rule 'cm-mobile-money' matched: currency XAF in [XAF, XOF], country CM in [CM]",
            "providers in order: monetbil, stripe",
        ],
    }
    assert scalar(sessions, "SELECT count(*) FROM orders") == 0


def test_routing_show_prints_the_rules_the_default_and_the_circuits(client, env):
    assert put_routing(client, RULES).status_code == 200

    printed = payfleet(env, "routing", "show")

    assert printed.returncode == 0, printed.stderr
    shown = json.loads(printed.stdout)
    assert shown["rules"] == RULES
    assert [rule["name"] for rule in shown["default"]] == ["default-mobile-money", "default"]
    assert shown["circuits"] == []


def test_routing_explain_refuses_a_bad_code(env):
    printed = payfleet(env, "routing", "explain", "--currency", "EURO")

    assert printed.returncode == 2
    assert "a 3-letter ISO code, not 'EURO'" in printed.stderr
