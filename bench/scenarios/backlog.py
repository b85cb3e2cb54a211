"""Scenario 4, backlog: N events stored while nothing ran (published_at
empty, as after an outage), for N pending orders; then a scheduler (its
outbox relay publishes them) and a worker start. Drain time, events/s, peak
RSS of the worker's processes, and the relay must publish each event once.
Reference: the same worker's apply speed on 2,000 more events published
directly, right after (the backlog should drain at apply speed)."""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta
from typing import Any

from psycopg import Connection

from bench import rabbit, seed
from bench.fleet import World, world
from bench.procs import RssSampler, wait_until
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
        # The reference, in the same world with the same worker: apply speed
        # on events published directly (no relay in the way).
        reference = _apply_speed(w, conn, min(REFERENCE_EVENTS, n), already_paid=n)
        outcome.figures["apply_reference_events_s"] = reference
        outcome.ratios["backlog events/s ÷ apply events/s (same worker)"] = round(n / seconds / reference, 3)


REFERENCE_EVENTS = 2000


def _apply_speed(w: World, conn: Connection[tuple[Any, ...]], count: int, *, already_paid: int) -> float:
    orders = seed.plan_orders(count, SKUS)
    seed.pending_orders(conn, orders, expires_in=timedelta(hours=2))
    ids = seed.succeeded_events(conn, orders, published=True)
    started = time.monotonic()
    rabbit.publish(w.broker_url, "payments", "apply_event", ([i] for i in ids))
    paid = "SELECT count(*) FROM orders WHERE status = 'paid'"
    wait_until(lambda: scalar(conn, paid) >= already_paid + count, 120 + count / 5, 0.1, "reference applied")
    return round(count / (time.monotonic() - started), 1)
