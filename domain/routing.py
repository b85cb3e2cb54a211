"""Payment routing: which providers, in which order, may take a payment.

The operator's rules are an ordered list; the first whose `match` fits the
payment (currency, country, amount in minor units; every key optional) gives
its providers in order. With no rule matching (or no rules at all), the
default applies: XAF and XOF to Monetbil, everything else to Stripe. From
those, routing skips a provider that cannot take the payment (its
capabilities), cannot be asked (not configured) or whose circuit is open.
Every decision is written down as steps, so explain and checkout say the
same thing."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain.errors import InvalidRequest
from domain.gateways import PaymentProvider
from domain.models import Order, Payment, RoutingRuleSet
from domain.orders import log_transition
from domain.products import iso

MAX_RULES = 100
MATCH_KEYS = ("currency", "country", "min_amount", "max_amount")
RULE_KEYS = ("name", "match", "providers")
MAX_AMOUNT = 2**63 - 1  # amounts are bigints


@dataclass(frozen=True)
class Match:
    currency: tuple[str, ...] | None = None
    country: tuple[str, ...] | None = None
    min_amount: int | None = None
    max_amount: int | None = None

    def misfit(self, currency: str, country: str | None, amount: int | None) -> str | None:
        """Why a payment does not fit, or None when it does. A payment
        without a country never fits a rule that names countries."""
        if self.currency is not None and currency not in self.currency:
            return f"currency {currency} not in [{', '.join(self.currency)}]"
        if self.country is not None and country not in self.country:
            return f"country {country or '(none given)'} not in [{', '.join(self.country)}]"
        if self.min_amount is not None and (amount is None or amount < self.min_amount):
            return f"amount {_amount(amount)} below {self.min_amount}"
        if self.max_amount is not None and (amount is None or amount > self.max_amount):
            return f"amount {_amount(amount)} above {self.max_amount}"
        return None

    def fit(self, currency: str, country: str | None, amount: int | None) -> str:
        """What a fitting payment met, for the steps."""
        met = []
        if self.currency is not None:
            met.append(f"currency {currency} in [{', '.join(self.currency)}]")
        if self.country is not None:
            met.append(f"country {country} in [{', '.join(self.country)}]")
        low, high = self.min_amount, self.max_amount
        if low is not None and high is not None:
            met.append(f"amount {amount} in [{low}, {high}]")
        elif low is not None:
            met.append(f"amount {amount} at least {low}")
        elif high is not None:
            met.append(f"amount {amount} at most {high}")
        return ", ".join(met) or "matches every payment"

    def as_json(self) -> dict[str, Any]:
        shown = {
            "currency": list(self.currency) if self.currency is not None else None,
            "country": list(self.country) if self.country is not None else None,
            "min_amount": self.min_amount,
            "max_amount": self.max_amount,
        }
        return {key: value for key, value in shown.items() if value is not None}


def _amount(amount: int | None) -> str:
    return "(unknown)" if amount is None else str(amount)


@dataclass(frozen=True)
class Rule:
    name: str
    match: Match
    providers: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "match": self.match.as_json(), "providers": list(self.providers)}


DEFAULT_RULES = (
    Rule("default-mobile-money", Match(currency=("XAF", "XOF")), ("monetbil",)),
    Rule("default", Match(), ("stripe",)),
)


# --- validation -----------------------------------------------------------------


def parse_rules(raw: Any, providers: Mapping[str, PaymentProvider]) -> list[Rule]:
    """The operator's rule list, checked whole; InvalidRequest names the
    first rule that is wrong and why."""
    if not isinstance(raw, list):
        raise InvalidRequest("'rules' must be a list of rules")
    if len(raw) > MAX_RULES:
        raise InvalidRequest(f"at most {MAX_RULES} rules")
    rules: list[Rule] = []
    for position, item in enumerate(raw):
        rule = _parse_rule(position, item, providers)
        if any(other.name == rule.name for other in rules):
            raise InvalidRequest(f"rule {rule.name!r}: the name is used twice", rule=rule.name)
        rules.append(rule)
    return rules


def _parse_rule(position: int, item: Any, providers: Mapping[str, PaymentProvider]) -> Rule:
    label = f"rule #{position + 1}"
    if not isinstance(item, dict):
        raise InvalidRequest(f"{label} must be an object with 'name', 'match' and 'providers'", rule=label)
    name = item.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
        raise InvalidRequest(f"{label}: 'name' must be 1 to 64 printable characters", rule=label)
    _no_other_keys(name, item, RULE_KEYS, "a rule")
    match = _parse_match(name, item.get("match", {}))
    chosen = item.get("providers")
    if not isinstance(chosen, list) or not chosen:
        raise InvalidRequest(f"rule {name!r}: 'providers' must list at least one provider", rule=name)
    for provider in chosen:
        if not isinstance(provider, str) or provider not in providers:
            known = ", ".join(sorted(providers))
            raise InvalidRequest(f"rule {name!r}: unknown provider {provider!r} (known: {known})", rule=name)
        _check_capable(name, match, providers[provider])
    if len(set(chosen)) != len(chosen):
        raise InvalidRequest(f"rule {name!r}: a provider is listed twice", rule=name)
    return Rule(name, match, tuple(chosen))


def _check_capable(name: str, match: Match, provider: PaymentProvider) -> None:
    """A provider listed for a currency or a country it can never take is a
    mistake the operator should hear about now, not at checkout."""
    can = provider.capabilities
    for currency in match.currency or ():
        if currency not in can.currencies:
            raise InvalidRequest(f"rule {name!r}: {provider.name} cannot take {currency}", rule=name)
    for country in match.country or ():
        if can.countries is not None and country not in can.countries:
            raise InvalidRequest(
                f"rule {name!r}: {provider.name} cannot take payments from {country}", rule=name
            )


def _parse_match(name: str, raw: Any) -> Match:
    if not isinstance(raw, dict):
        raise InvalidRequest(f"rule {name!r}: 'match' must be an object", rule=name)
    _no_other_keys(name, raw, MATCH_KEYS, "'match'")
    low = _amount_bound(name, raw, "min_amount")
    high = _amount_bound(name, raw, "max_amount")
    if low is not None and high is not None and low > high:
        raise InvalidRequest(f"rule {name!r}: min_amount {low} is above max_amount {high}", rule=name)
    return Match(
        currency=_codes(name, raw, "currency", 3),
        country=_codes(name, raw, "country", 2),
        min_amount=low,
        max_amount=high,
    )


def _no_other_keys(name: str, raw: dict[str, Any], allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise InvalidRequest(
            f"rule {name!r}: {what} has unknown keys {unknown} (allowed: {', '.join(allowed)})", rule=name
        )


def _codes(name: str, raw: dict[str, Any], key: str, length: int) -> tuple[str, ...] | None:
    """ISO codes (currency: 3 letters, country: 2), upper-cased, in order."""
    if raw.get(key) is None:
        return None
    codes = raw[key]
    kind = "3-letter currency" if length == 3 else "2-letter country"
    if not isinstance(codes, list) or not codes:
        raise InvalidRequest(f"rule {name!r}: '{key}' must be a non-empty list of {kind} codes", rule=name)
    for code in codes:
        if not (isinstance(code, str) and len(code) == length and code.isascii() and code.isalpha()):
            raise InvalidRequest(f"rule {name!r}: {code!r} is not a {kind} code", rule=name)
    return tuple(dict.fromkeys(code.upper() for code in codes))


def _amount_bound(name: str, raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_AMOUNT:
        raise InvalidRequest(
            f"rule {name!r}: '{key}' must be a whole number of minor units, 0 or more", rule=name
        )
    return value


def parse_stored(rules: list[dict[str, Any]]) -> list[Rule]:
    """Rules as stored (validated when they were put): read without the
    capability checks, so a stored list never stops routing."""
    return [
        Rule(
            rule["name"],
            Match(
                currency=tuple(rule["match"]["currency"]) if "currency" in rule["match"] else None,
                country=tuple(rule["match"]["country"]) if "country" in rule["match"] else None,
                min_amount=rule["match"].get("min_amount"),
                max_amount=rule["match"].get("max_amount"),
            ),
            tuple(rule["providers"]),
        )
        for rule in rules
    ]


# --- storage --------------------------------------------------------------------


def rules_in_force(session: Session) -> list[Rule]:
    """The newest rule list; empty when the operator never set one."""
    rules = session.scalar(select(RoutingRuleSet.rules).order_by(RoutingRuleSet.id.desc()).limit(1))
    return parse_stored(rules or [])


def replace_rules(session: Session, rules: list[Rule]) -> RoutingRuleSet:
    """The whole list replaced; the old one stays in the history."""
    version = RoutingRuleSet(rules=[rule.as_json() for rule in rules])
    session.add(version)
    session.flush()
    return version


def history(session: Session, limit: int) -> list[dict[str, Any]]:
    """Every change, newest first."""
    versions = session.scalars(select(RoutingRuleSet).order_by(RoutingRuleSet.id.desc()).limit(limit))
    return [{"version": v.id, "changed_at": iso(v.changed_at), "rules": v.rules} for v in versions]


# --- resolution -----------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Where a payment goes: the rule that chose (None: the default), the
    providers to ask in order, those skipped and why, and every step."""

    rule: str | None
    providers: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    steps: tuple[str, ...] = field(default=())
    forced: bool = False  # the request named its provider

    @property
    def rule_label(self) -> str:
        """The rule as metrics name it."""
        return "forced" if self.forced else self.rule or "default"

    def as_json(self) -> dict[str, Any]:
        return {"providers": list(self.providers), "rule": self.rule, "steps": list(self.steps)}


def resolve(
    rules: list[Rule],
    providers: Mapping[str, PaymentProvider],
    open_circuits: Mapping[str, datetime],
    *,
    currency: str,
    country: str | None,
    amount: int | None,
) -> Route:
    """Pure: the route for a payment, from the rules, the providers'
    capabilities and health, and the circuits open now."""
    steps: list[str] = []
    chosen: Rule | None = None
    for rule in rules:
        misfit = rule.match.misfit(currency, country, amount)
        if misfit is None:
            chosen = rule
            steps.append(f"rule {rule.name!r} matched: {rule.match.fit(currency, country, amount)}")
            break
        steps.append(f"rule {rule.name!r} skipped: {misfit}")
    if chosen is None:
        fallback = next(r for r in DEFAULT_RULES if r.match.misfit(currency, country, amount) is None)
        what = "no rule matched" if rules else "no routing rules set"
        steps.append(f"{what}: default routing, {currency} to {', '.join(fallback.providers)}")
        candidates = fallback.providers
    else:
        candidates = chosen.providers
    usable: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name in candidates:
        reason = _skip_reason(providers.get(name), open_circuits.get(name), currency, country, amount)
        if reason is None:
            usable.append(name)
        else:
            skipped.append((name, reason))
            steps.append(f"{name} skipped: {reason}")
    steps.append(f"providers in order: {', '.join(usable)}" if usable else "no provider can take it")
    return Route(chosen.name if chosen else None, tuple(usable), tuple(skipped), tuple(steps))


def _skip_reason(
    provider: PaymentProvider | None,
    open_until: datetime | None,
    currency: str,
    country: str | None,
    amount: int | None,
) -> str | None:
    if provider is None:
        return "not a provider of this installation"
    refusal = provider.capabilities.refusal(currency, country, amount)
    if refusal is not None:
        return refusal
    unhealthy = provider.health()
    if unhealthy is not None:
        return unhealthy
    if open_until is not None:
        return f"circuit open until {iso(open_until)}"
    return None


def forced(provider: PaymentProvider, currency: str, country: str | None, amount: int) -> Route:
    """An explicitly chosen provider: asked whatever the rules and circuits
    say, but never for a payment it cannot take."""
    refusal = provider.capabilities.refusal(currency, country, amount)
    if refusal is not None:
        raise InvalidRequest(f"{provider.name} {refusal}", provider=provider.name)
    return Route(None, (provider.name,), (), (f"provider {provider.name} chosen by the request",), True)


# --- the payment's provider, attempt by attempt ---------------------------------


def switch_provider(session: Session, payment_id: uuid.UUID, provider: str, why: str) -> bool:
    """The order's payment moves to the next provider after `why`: the same
    payment row, order and reservation, so nothing is reserved twice.
    False (and nothing changed) once the payment or order moved on."""
    # Payment before order: the payment path's lock order.
    payment = session.get_one(Payment, payment_id, with_for_update=True)
    order = session.get_one(Order, payment.order_id, with_for_update=True)
    if payment.status != "pending" or order.status != "pending_payment":
        return False
    log_transition(session, order.id, "payment", "pending", "pending", f"routing: {why}; trying {provider}")
    payment.provider, payment.provider_payment_id = provider, None
    payment.updated_at = datetime.now(UTC)
    return True


def record_start(
    session: Session, payment_id: uuid.UUID, provider_payment_id: str | None, decision: str | None
) -> None:
    """The provider started the payment: its id, and the routing decision
    on the order's timeline."""
    payment = session.get_one(Payment, payment_id, with_for_update=True)
    if provider_payment_id is not None:
        payment.provider_payment_id = provider_payment_id
    if decision is not None:
        log_transition(session, payment.order_id, "payment", payment.status, payment.status, decision)
