"""Scenario 3, expire: N stale pending Stripe orders (payment window past)
whose PaymentIntents the fake Stripe knows; one manual run of
expire-stale-orders (POST /admin/jobs/expire-stale-orders/run) with a worker
running, for each (fake Stripe latency, STRIPE_MAX_RPS). Reference: the rate
limit (calls/s ÷ STRIPE_MAX_RPS) and, unlimited, the goal of 150 orders/s."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import requests

from bench import seed
from bench.fleet import ADMIN_TOKEN, World, world
from bench.procs import wait_until
from bench.report import Outcome
from bench.scenarios import Context
from bench.scenarios.common import scalar
from tests.fakes.stripe_server import FakeStripe

UNLIMITED = 100_000
GOAL_ORDERS_S = 150.0
JOB = "expire-stale-orders"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SKUS = [f"EXP-{i:02d}" for i in range(10)]
# The stale orders' checkouts are spread over 25 minutes of the past hour.
CHECKOUTS_SPAN = timedelta(minutes=25)


def run(ctx: Context, outcome: Outcome) -> None:
    for latency_ms, rps in ctx.params.expire_variants:
        slow = latency_ms > 0 or rps < UNLIMITED
        n = ctx.params.expire_slow_orders if slow else ctx.params.expire_orders
        label = f"{latency_ms} ms, {'unlimited' if rps >= UNLIMITED else f'{rps} rps'}"
        # A Stripe of each variant's own: one variant's intents are not in
        # the next one's lists.
        with FakeStripe() as fake, world(ctx.template, f"expire_{latency_ms}ms_{rps}rps") as w:
            w.stripe_api_base = fake.base_url
            figures = _variant(w, ctx, fake, n, latency_ms, rps, outcome, label)
        outcome.figures[label] = figures
        if rps >= UNLIMITED:
            outcome.ratios[f"orders/s ÷ goal {GOAL_ORDERS_S:.0f}, {label}"] = round(
                figures["orders_s"] / GOAL_ORDERS_S, 3
            )
        else:
            outcome.ratios[f"calls/s ÷ STRIPE_MAX_RPS, {label}"] = round(figures["stripe_calls_s"] / rps, 3)


def _variant(
    w: World, ctx: Context, fake: FakeStripe, n: int, latency_ms: int, rps: int, outcome: Outcome, label: str
) -> dict[str, Any]:
    fake.delay(0)
    with w.connect() as conn:
        seed.products(conn, SKUS, n)
        orders = seed.plan_orders(n, SKUS)
        # Checkouts evenly spread from an hour ago over CHECKOUTS_SPAN, each
        # window 30 minutes: all over by now. Each PaymentIntent was created
        # with its order, as at checkout.
        created_at = seed.pending_orders(
            conn,
            orders,
            created_ago=timedelta(hours=1),
            expires_in=timedelta(minutes=-30),
            spacing=CHECKOUTS_SPAN / n,
        )
        for o, created in zip(orders, created_at, strict=True):
            metadata = {"order_id": str(o.order_id), "payment_id": str(o.payment_id)}
            fake.add_payment_intent(
                id=o.intent_id,
                amount=o.amount,
                currency="eur",
                metadata=metadata,
                created=int(created.timestamp()),
            )
        base = w.ingress()
        w.worker(ctx.params.processes, ctx.params.threads, STRIPE_MAX_RPS=str(rps))
        fake.delay(latency_ms / 1000)
        since = time.time()
        answer = requests.post(f"{base}/admin/jobs/{JOB}/run", headers=ADMIN, timeout=30)
        answer.raise_for_status()
        run_id = answer.json()["run_id"]
        # At most two calls an order at the slower of the limit and the latency, doubled, plus start-up.
        pace = min(rps, 1000 / latency_ms if latency_ms else rps)
        record = _wait_run(base, run_id, timeout=60 + 4 * n / pace)
        fake.delay(0)
        calls = sorted(
            r.time for r in fake.requests if r.time >= since and r.path.startswith("/v1/payment_intents")
        )
        expired = scalar(conn, "SELECT count(*) FROM orders WHERE status = 'expired'")
        reserved = scalar(conn, "SELECT coalesce(sum(reserved), 0) FROM products")
    canceled = sum(1 for o in orders if (fake.get(o.intent_id) or {}).get("status") == "canceled")
    seconds = float(record.get("duration_seconds") or 0.0)
    outcome.check(
        f"{label}: run succeeded",
        record["state"] == "succeeded",
        f"{record['state']} {record.get('error') or ''}",
    )
    outcome.check(f"{label}: every order expired", expired == n, f"{expired}/{n}")
    outcome.check(f"{label}: every PaymentIntent canceled", canceled == n, f"{canceled}/{n}")
    outcome.check(f"{label}: nothing reserved", reserved == 0, f"reserved {reserved}")
    span = calls[-1] - calls[0] if len(calls) > 1 else 0.0
    return {
        "orders": n,
        "run_seconds": round(seconds, 2),
        "orders_s": round(expired / seconds, 1) if seconds else 0.0,
        "stripe_calls": len(calls),
        "stripe_calls_s": round(len(calls) / span, 1) if span else 0.0,
        "peak_calls_in_1s": _peak(calls),
        "counts": record.get("counts", {}),
    }


def _wait_run(base: str, run_id: int, timeout: float) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def finished() -> bool:
        runs = requests.get(
            f"{base}/admin/jobs/runs", params={"job": JOB, "limit": "20"}, headers=ADMIN, timeout=10
        )
        for record in runs.json()["runs"]:
            if record["id"] == run_id and record["state"] in ("succeeded", "failed", "skipped"):
                found.update(record)
                return True
        return False

    wait_until(finished, timeout, 0.5, f"run {run_id} of {JOB} finished")
    return found


def _peak(times: list[float]) -> int:
    """Most calls within any one-second window."""
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best
