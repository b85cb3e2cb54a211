"""Scenario 6, soak: checkouts against the fake Stripe, each followed by its
signed `payment_intent.succeeded` webhook, at a steady rate for a while, with
the whole fleet running; RSS of the ingress and of the worker (all their
processes) at the start and at the end, and their growth."""

from __future__ import annotations

import threading
import time
from typing import Any

import requests

from bench import events, seed
from bench.fleet import WEBHOOK_SECRET, World, world
from bench.procs import group_rss_bytes, wait_until
from bench.report import Outcome
from bench.scenarios import Context
from bench.scenarios.common import count
from tests.fakes.stripe_server import FakeStripe

SKUS = [f"SOAK-{i:02d}" for i in range(20)]
DRIVERS = 4
MIB = 1 << 20


class Driver(threading.Thread):
    """One shopper after another: check out, then Stripe says it succeeded."""

    def __init__(self, base: str, fake: FakeStripe, interval: float, until: float, index: int) -> None:
        super().__init__(daemon=True, name=f"soak-{index}")
        self.base, self.fake, self.interval, self.until, self.index = base, fake, interval, until, index
        self.counts: dict[str, int] = {"checkouts": 0, "webhooks": 0, "errors": 0}
        self.last_error = ""

    def run(self) -> None:
        session, turn = requests.Session(), 0
        next_at = time.monotonic()
        while time.monotonic() < self.until and turn < 10_000_000:
            turn += 1
            try:
                self._one(session, SKUS[(self.index + turn) % len(SKUS)])
            except (requests.RequestException, KeyError, ValueError) as error:
                self.counts["errors"] += 1
                self.last_error = f"{type(error).__name__}: {error}"[:300]
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def _one(self, session: requests.Session, sku: str) -> None:
        body = {"items": [{"sku": sku, "quantity": 1}], "provider": "stripe", "currency": "EUR"}
        placed = session.post(f"{self.base}/checkout", json=body, timeout=30)
        if placed.status_code != 201:
            raise ValueError(f"checkout answered {placed.status_code}: {placed.text[:200]}")
        self.counts["checkouts"] += 1
        intent_id = placed.json()["payment"]["provider_payment_id"]
        intent = self.fake.get(intent_id) or {}
        payload = events.encode(
            events.intent_event(intent_id, int(intent["amount"]), dict(intent["metadata"]))
        )
        headers = {
            "Stripe-Signature": events.signed(payload, WEBHOOK_SECRET),
            "Content-Type": "application/json",
        }
        answer = session.post(f"{self.base}/webhooks/stripe", data=payload, headers=headers, timeout=30)
        if answer.status_code != 200:
            raise ValueError(f"webhook answered {answer.status_code}: {answer.text[:200]}")
        self.counts["webhooks"] += 1


def run(ctx: Context, outcome: Outcome) -> None:
    p = ctx.params
    with FakeStripe() as fake, world(ctx.template, "soak") as w:
        w.stripe_api_base = fake.base_url
        with w.connect() as conn:
            seed.products(conn, SKUS, 10_000_000)
            base = w.ingress()
            worker = w.worker(p.processes, p.threads)
            w.scheduler()
            ingress = next(proc for proc in w.procs.started if proc.name == "ingress")
            until = time.monotonic() + p.soak_warm_up + p.soak_seconds
            drivers = [Driver(base, fake, DRIVERS / p.soak_rate, until, i) for i in range(DRIVERS)]
            for driver in drivers:
                driver.start()
            time.sleep(p.soak_warm_up)
            start = _rss(w, ingress.pid, worker.pid)
            for driver in drivers:
                driver.join(p.soak_seconds + 120)
            end = _rss(w, ingress.pid, worker.pid)
            counts = {k: sum(d.counts[k] for d in drivers) for k in ("checkouts", "webhooks", "errors")}
            paid_sql = "SELECT count(*) FROM orders WHERE status = 'paid'"
            wait_until(
                lambda: count(conn, paid_sql) >= counts["webhooks"], 120, 0.5, "every paid checkout applied"
            )
        outcome.figures["seconds"] = p.soak_seconds
        outcome.figures.update(counts)
        outcome.figures["checkouts_s"] = round(counts["checkouts"] / (p.soak_warm_up + p.soak_seconds), 1)
        for name in ("ingress", "worker"):
            growth = 100 * (end[name] - start[name]) / start[name] if start[name] else 0.0
            outcome.figures[f"{name}_rss_mib"] = {
                "start": round(start[name] / MIB, 1),
                "end": round(end[name] / MIB, 1),
                "growth_pct": round(growth, 1),
            }
            outcome.ratios[f"{name} RSS end ÷ start"] = (
                round(end[name] / start[name], 3) if start[name] else 0.0
            )
        outcome.check("no failed checkout or webhook", counts["errors"] == 0, _first_error(drivers))
        outcome.check("load was applied", counts["webhooks"] > 0)


def _rss(w: World, ingress_pgid: int, worker_pgid: int) -> dict[str, Any]:
    return {"ingress": group_rss_bytes(ingress_pgid), "worker": group_rss_bytes(worker_pgid)}


def _first_error(drivers: list[Driver]) -> str:
    return next((d.last_error for d in drivers if d.last_error), "")
