"""Scenario 4, backlog: N events stored while nothing ran (published_at
empty, as after an outage), for N pending orders; then a scheduler (its
outbox relay publishes them) and a worker start. Drain time, events/s, peak
RSS of the worker's processes, and the relay must publish each event once."""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta

from bench import rabbit, seed
from bench.fleet import world
from bench.procs import RssSampler
from bench.report import Outcome
from bench.scenarios import Context
from bench.scenarios.common import check_sales, scalar
from tests.fakes.stripe_server import FakeStripe

SKUS = [f"BKL-{i:02d}" for i in range(50)]
MIB = 1 << 20


def run(ctx: Context, outcome: Outcome) -> None:
    p, n = ctx.params, ctx.params.backlog_events
    relay = {} if p.relay_interval is None else {"OUTBOX_RELAY_INTERVAL_SECONDS": str(p.relay_interval)}
    # The scheduler may start a scheduled Stripe job meanwhile: it gets an empty fake Stripe.
    with FakeStripe() as fake, world(ctx.template, "backlog", relay) as w, w.connect() as conn:
        w.stripe_api_base = fake.base_url
        seeding = time.monotonic()
        seed.products(conn, SKUS, n)
        orders = seed.plan_orders(n, SKUS)
        seed.pending_orders(conn, orders, expires_in=timedelta(hours=2))
        seed.succeeded_events(conn, orders, published=False, received_ago=timedelta(minutes=1))
        outcome.figures["seed_seconds"] = round(time.monotonic() - seeding, 1)
        started = time.monotonic()
        w.scheduler()
        worker = w.worker(p.processes, p.threads)
        sampler = RssSampler(worker.pid)
        deadline = started + 300 + n / 20
        paid = 0
        while time.monotonic() < deadline:
            sampler.sample()
            paid = scalar(conn, "SELECT count(*) FROM orders WHERE status = 'paid'")
            if paid >= n:
                break
            time.sleep(0.5)
        seconds = time.monotonic() - started
        outcome.check("drained before the deadline", paid >= n, f"{paid}/{n} paid")
        relay_span = scalar(
            conn, "SELECT extract(epoch FROM max(published_at) - min(published_at)) FROM provider_events"
        )
        outcome.figures["events"] = n
        outcome.figures["drain_seconds"] = round(seconds, 1)
        outcome.figures["events_s"] = round(n / seconds, 1)
        outcome.figures["relay_events_s"] = round(n / float(relay_span), 1) if relay_span else None
        outcome.figures["worker_peak_rss_mib"] = round(sampler.peak / MIB, 1)
        check_sales(conn, outcome, "backlog", n, n, dict(Counter(s for o in orders for s, _ in o.lines)), n)
        unpublished = scalar(conn, "SELECT count(*) FROM provider_events WHERE published_at IS NULL")
        outcome.check("every event published", unpublished == 0, f"{unpublished} unpublished")
        published = rabbit.published_count(w.vhost, "payments", n)
        if published is None:
            outcome.notes.append("publish counter unavailable (no management API)")
        else:
            outcome.figures["messages_published"] = published
            outcome.check(
                "relay published each event once", published == n, f"{published} messages for {n} events"
            )
        outcome.ratios["events/s ÷ relay ceiling (batch 500 per tick)"] = _ceiling_ratio(
            n / seconds, p.relay_interval
        )


def _ceiling_ratio(rate: float, interval: float | None) -> float:
    """The relay publishes at most 500 events a tick (OUTBOX_RELAY_INTERVAL_SECONDS, 2 s by default)."""
    return round(rate / (500 / (interval or 2.0)), 3)
