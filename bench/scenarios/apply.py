"""Scenario 2, apply: N stored `payment_intent.succeeded` events for N
pending Stripe orders (over many SKUs, then all on one hot SKU), one
`apply_event` message each already queued; time from `payfleet worker`
starting to every order paid. Reference: Dramatiq workers with a no-op
actor (same processes and threads) draining N messages. Each variant runs
in rounds, the two taking turns; the medians are compared."""

from __future__ import annotations

import sys
import time
from collections import Counter
from datetime import timedelta
from typing import Any

from bench import rabbit, seed
from bench.fleet import BENCH_ROOT, World, world
from bench.procs import wait_until
from bench.report import Outcome
from bench.scenarios import Context
from bench.scenarios.common import check_sales, count, scalar


def run(ctx: Context, outcome: Outcome) -> None:
    p = ctx.params
    variants = {f"{p.apply_skus} SKUs": [f"SKU-{i:03d}" for i in range(p.apply_skus)], "1 hot SKU": ["HOT"]}
    for label, skus in variants.items():
        tag = "many" if len(skus) > 1 else "hot"
        # Rounds, payfleet and the no-op taking turns, medians compared: a
        # drain of 2,000 no-ops lasts well under a second, mostly its start,
        # and one such sample swings by a third from run to run.
        mine_rounds: list[dict[str, Any]] = []
        refs: list[float] = []
        for number in range(1, p.apply_rounds + 1):
            named = f"{label}, round {number}" if p.apply_rounds > 1 else label
            with world(ctx.template, f"apply_{tag}") as w:
                mine_rounds.append(_apply(w, ctx, skus, outcome, named))
                refs.append(_noop(w, ctx))
        # The median round of each (the upper one of an even count), chosen
        # the same way for both, as the ingest scenario does.
        mine = sorted(mine_rounds, key=lambda r: r["events_s"])[len(mine_rounds) // 2]
        ref = sorted(refs)[len(refs) // 2]
        figures = {**mine, "noop_msg_s": ref}
        if p.apply_rounds > 1:
            figures |= {"rounds_events_s": [r["events_s"] for r in mine_rounds], "rounds_noop_msg_s": refs}
        outcome.figures[label] = figures
        outcome.ratios[f"events/s ÷ no-op msg/s, {label}"] = round(mine["events_s"] / ref, 3)


def _apply(w: World, ctx: Context, skus: list[str], outcome: Outcome, label: str) -> dict[str, Any]:
    n, initial = ctx.params.apply_events, ctx.params.apply_events * 2
    with w.connect() as conn:
        seed.products(conn, skus, initial)
        orders = seed.plan_orders(n, skus)
        seed.pending_orders(conn, orders, expires_in=timedelta(hours=1))
        ids = seed.succeeded_events(conn, orders, published=True)
        rabbit.publish(w.broker_url, "payments", "apply_event", ([i] for i in ids))
        started = time.time()
        w.worker(ctx.params.processes, ctx.params.threads)
        paid_sql = "SELECT count(*) FROM orders WHERE status = 'paid'"
        wait_until(
            lambda: count(conn, paid_sql) >= n, timeout=120 + n / 5, interval=0.1, what=f"{n} orders paid"
        )
        # The end is the last batch's own time (its transaction's start,
        # a few ms before its commit), not when a look every 0.1 s saw it:
        # that was ±0.1 s of a drain lasting under 2 s. Same host, same clock.
        first, last = conn.execute(
            "SELECT extract(epoch FROM min(processed_at)), extract(epoch FROM max(processed_at))"
            " FROM provider_events"
        ).fetchone() or (None, None)
        assert first is not None and last is not None, "every event is processed"
        seconds = float(last) - started
        spread = float(last) - float(first)
        sold = Counter(sku for o in orders for sku, _ in o.lines)
        check_sales(conn, outcome, label, n, n, dict(sold), initial)
        processed = scalar(conn, "SELECT count(*) FROM provider_events WHERE status = 'processed'")
        outcome.check(f"{label}: every event processed", processed == n, f"{processed}/{n}")
        retried = scalar(conn, "SELECT count(*) FROM provider_events WHERE attempts > 1")
    return {
        "events": n,
        "seconds": round(seconds, 2),
        "events_s": round(n / seconds, 1),
        "events_s_first_to_last": round(n / float(spread), 1) if spread else None,
        "events_retried": retried,
    }


def _noop(w: World, ctx: Context) -> float:
    n = ctx.params.apply_events
    rabbit.publish(w.broker_url, rabbit.NOOP_QUEUE, rabbit.NOOP_ACTOR, ([i] for i in range(n)))
    argv = [
        sys.executable, "-m", "dramatiq", "bench.noop_worker",
        "--processes", str(ctx.params.processes), "--threads", str(ctx.params.threads),
        "--queues", rabbit.NOOP_QUEUE,
    ]  # fmt: skip
    started = time.monotonic()
    env = w.env(BENCH_BROKER_URL=w.broker_url, PYTHONPATH=str(BENCH_ROOT))
    proc = w.procs.spawn("noop-worker", argv, env, cwd=BENCH_ROOT)
    # Ready messages reach 0 with at most a prefetch of no-ops left
    # (microseconds each); asked every 10 ms.
    rabbit.wait_drained(w.broker_url, rabbit.NOOP_QUEUE, timeout=120 + n / 50)
    seconds = time.monotonic() - started
    w.procs.stop(proc)
    return round(n / seconds, 1)
