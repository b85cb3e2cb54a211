"""`payfleet routing explain|show`: where a payment would go and why, and the
rules and circuits in force, read from PostgreSQL without creating anything."""

from __future__ import annotations

import argparse
from typing import Any

from domain import circuit, routing
from domain.gateways import (
    MonetbilApiGateway,
    MonetbilLinks,
    PaymentProvider,
    StripeApiGateway,
    payment_providers,
)
from ingress.app import circuit_policy
from ingress.checkout import Router
from payfleet.cli import print_json
from payfleet.platform.config import Settings
from payfleet.platform.db import engine_for, make_sessions


def _providers(settings: Settings) -> dict[str, PaymentProvider]:
    # Built as the ingress builds them (capabilities, and whether each is
    # configured); explaining never calls a provider.
    return payment_providers(
        StripeApiGateway(settings.stripe_api_key, settings.stripe_api_base),
        MonetbilApiGateway(settings.monetbil_service_key, settings.monetbil_api_base),
        MonetbilLinks(f"{settings.public_base_url}/webhooks/monetbil", settings.public_base_url),
    )


def _explain(settings: Settings, args: argparse.Namespace) -> int:
    router = Router(_providers(settings), circuit_policy(settings))
    with make_sessions(engine_for(settings))() as session:
        route = router.route(session, args.currency, args.country, args.amount)
    print_json(route.as_json())
    return 0


def _show(settings: Settings, args: argparse.Namespace) -> int:
    with make_sessions(engine_for(settings))() as session:
        rules = routing.rules_in_force(session)
        circuits = circuit.circuit_states(session)
    print_json(
        {
            "rules": [rule.as_json() for rule in rules],
            "default": [rule.as_json() for rule in routing.DEFAULT_RULES],
            "circuits": circuits,
        }
    )
    return 0


def _code(length: int) -> Any:
    def parse(text: str) -> str:
        if len(text) != length or not (text.isascii() and text.isalpha()):
            raise argparse.ArgumentTypeError(f"a {length}-letter ISO code, not {text!r}")
        return text.upper()

    return parse


def _amount(text: str) -> int:
    try:
        amount = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of minor units, not {text!r}") from None
    if not 0 <= amount <= routing.MAX_AMOUNT:
        raise argparse.ArgumentTypeError(f"a whole number of minor units, 0 or more, not {text!r}")
    return amount


def add_commands(commands: Any) -> None:
    group = commands.add_parser("routing", help="payment routing: explain a payment, show the rules")
    actions = group.add_subparsers(dest="action", required=True)
    explain = actions.add_parser("explain", help="the providers a payment would be offered, and why")
    explain.add_argument("--currency", type=_code(3), required=True)
    explain.add_argument("--country", type=_code(2))
    explain.add_argument("--amount", type=_amount, help="in minor units")
    explain.set_defaults(run=_explain)
    actions.add_parser("show", help="the rules in force, the default and the circuits").set_defaults(
        run=_show
    )
