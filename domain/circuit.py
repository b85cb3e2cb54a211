"""Each provider's circuit, shared by every ingress process through
PostgreSQL: a provider that failed `failures` times within `window` is
skipped by routing until `cooldown` has passed. The first attempt after the
cool-down decides: a success closes the circuit, a failure opens it again at
once.

Times are PostgreSQL's `now()`, so processes on hosts with drifting clocks
agree. Outcomes are recorded in short transactions of their own, after the
provider call (never while it is in flight), and only a failure, or the
first success after failures, writes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from domain.models import ProviderCircuit


@dataclass(frozen=True)
class CircuitPolicy:
    failures: int
    window: timedelta
    cooldown: timedelta


def open_circuits(session: Session) -> dict[str, datetime]:
    """The providers skipped right now, with the time each is tried again."""
    rows = session.execute(
        select(ProviderCircuit.provider, ProviderCircuit.open_until).where(
            ProviderCircuit.open_until > func.now()
        )
    )
    return {provider: until for provider, until in rows if until is not None}


def record_failure(session: Session, provider: str, policy: CircuitPolicy) -> datetime | None:
    """Count a failure; returns the time until which the provider is now
    skipped, if this failure opened its circuit (or it was open already)."""
    session.execute(insert(ProviderCircuit).values(provider=provider).on_conflict_do_nothing())
    circuit = session.get_one(ProviderCircuit, provider, with_for_update=True, populate_existing=True)
    now = session.scalar(select(func.now()))
    assert now is not None
    if circuit.open_until is not None and circuit.open_until > now:
        # A call that began before another process opened it.
        return circuit.open_until
    recent = [at for at in circuit.failures if at > now - policy.window] + [now]
    # open_until still set after its cool-down: no success since, so this
    # was the trial attempt, and it failed.
    trial_failed = circuit.open_until is not None
    circuit.updated_at = now
    if len(recent) >= policy.failures or trial_failed:
        circuit.open_until, circuit.failures = now + policy.cooldown, []
        return circuit.open_until
    circuit.failures = recent
    return None


def record_success(session: Session, provider: str) -> None:
    """A provider that answered is healthy: its failures are forgotten and
    its circuit closed. Writes nothing when there was nothing to forget."""
    session.execute(
        update(ProviderCircuit)
        .where(
            ProviderCircuit.provider == provider,
            (func.cardinality(ProviderCircuit.failures) > 0) | ProviderCircuit.open_until.is_not(None),
        )
        .values(failures=[], open_until=None, updated_at=func.now())
    )


def circuit_states(session: Session) -> list[dict[str, object]]:
    """Every provider that has a circuit row, as the operator reads it."""
    now = session.scalar(select(func.now()))
    rows = session.scalars(select(ProviderCircuit).order_by(ProviderCircuit.provider))
    return [
        {
            "provider": row.provider,
            "open": row.open_until is not None and now is not None and row.open_until > now,
            "open_until": row.open_until.isoformat() if row.open_until else None,
            "recent_failures": len(row.failures),
        }
        for row in rows
    ]
