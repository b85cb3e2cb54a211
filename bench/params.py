"""The knobs of a bench run: two scales (smoke: seconds, every path once;
full: the figures) and per-knob overrides from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Params:
    processes: int = 2
    threads: int = 8
    ingest_seconds: float = 12.0
    ingest_connections: tuple[int, ...] = (2, 16)
    ingest_rounds: int = 3  # each server measured this many times per connection count, alternately
    apply_events: int = 2000
    apply_skus: int = 50
    # Each variant and its no-op reference measured this many times, alternately.
    # Five: the no-op's own rounds spread by a third (a drain of 2,000 no-ops
    # is mostly its start), and its median with them.
    apply_rounds: int = 5
    expire_orders: int = 2000
    # Rate-limited or slow variants take N * 2 calls / rate seconds; they get fewer orders.
    expire_slow_orders: int = 500
    expire_variants: tuple[tuple[int, int], ...] = ((0, 100_000), (0, 100), (0, 25), (50, 100), (50, 25))
    backlog_events: int = 100_000
    relay_interval: float | None = None  # None: payfleet's default
    outage_before: float = 5.0
    outage_cut: float = 20.0
    outage_after: float = 10.0
    soak_seconds: float = 600.0
    soak_rate: float = 20.0  # checkouts (each followed by its webhook) per second
    soak_warm_up: float = 30.0  # seconds of load before the start RSS is taken (caches, pools warm)
    extra: dict[str, str] = field(default_factory=dict)


def for_scale(scale: str) -> Params:
    if scale == "full":
        return Params()
    if scale == "smoke":
        return Params(
            ingest_seconds=1.0,
            ingest_rounds=1,
            apply_events=80,
            apply_skus=10,
            apply_rounds=1,
            expire_orders=60,
            expire_slow_orders=20,
            expire_variants=((0, 100_000), (50, 100)),
            backlog_events=300,
            relay_interval=0.5,
            outage_before=1.0,
            outage_cut=4.0,
            outage_after=1.0,
            soak_seconds=20.0,
            soak_rate=10.0,
            soak_warm_up=5.0,
        )
    raise ValueError(f"unknown scale {scale!r}")
