"""Scenario 1, ingest: unique signed `payment_intent.succeeded` webhooks sent
by wrk at each connection count, worker not running, to the payfleet ingress
and to the bare endpoint (the reference) under the same gunicorn settings.
Afterwards every 2xx must be stored and queued exactly once.

Each connection count is measured in rounds, payfleet and bare taking turns,
and the medians are compared: which gunicorn worker accepts which of wrk's
connections is up to the kernel, and at 2 connections a round where both
land in one worker runs at about half the rate of one where they are
spread, for either server."""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench import rabbit, wrk
from bench.fleet import WEBHOOK_SECRET, World, world
from bench.procs import group_cpu_seconds, group_pids
from bench.report import Outcome
from bench.scenarios import Context
from bench.scenarios.common import Conn, scalar, start_bare

# Upper bound of the rate either server reaches here; the requests file must
# hold more unique events than wrk sends (a wrap would send duplicates).
MAX_RATE = 4000


def run(ctx: Context, outcome: Outcome) -> None:
    seconds = ctx.params.ingest_seconds
    with world(ctx.template, "ingest") as w, w.connect() as conn:
        payfleet_base = w.ingress()
        ingress_pgid = next(p.pid for p in w.procs.started if p.name == "ingress")
        bare_base, bare = start_bare(w)
        outcome.figures["gunicorn workers (each)"] = len(group_pids(ingress_pgid)) - 1
        for connections in ctx.params.ingest_connections:
            servers = {"payfleet": (payfleet_base, ingress_pgid), "bare": (bare_base, bare.pid)}
            rounds: dict[str, list[dict[str, Any]]] = {target: [] for target in servers}
            for _ in range(ctx.params.ingest_rounds):
                for target, (base, pgid) in servers.items():
                    rounds[target].append(_phase(w, conn, target, base, pgid, connections, seconds, outcome))
            mine, ref = (_median_round(outcome, target, connections, rounds[target]) for target in rounds)
            outcome.ratios[f"req/s payfleet/bare @{connections}c"] = round(mine["req_s"] / ref["req_s"], 3)
            outcome.ratios[f"CPU/request payfleet/bare @{connections}c"] = round(
                mine["cpu_ms_per_req"] / ref["cpu_ms_per_req"], 2
            )


def _median_round(
    outcome: Outcome, target: str, connections: int, rounds: list[dict[str, Any]]
) -> dict[str, Any]:
    """The round of median rate, as the figures, with every round's rate."""
    median = sorted(rounds, key=lambda r: r["req_s"])[len(rounds) // 2]
    figures = {**median, "rounds_req_s": [r["req_s"] for r in rounds]} if len(rounds) > 1 else median
    figures["cpu_ms_per_req"] = round(statistics.median(r["cpu_ms_per_req"] for r in rounds), 3)
    outcome.figures[f"{target} @{connections}c"] = figures
    return figures


_COUNTS = {
    "payfleet": ("SELECT count(*) FROM provider_events", "payments"),
    "bare": ("SELECT count(*) FROM bench_bare_events", "bare_payments"),
}


def _phase(
    w: World,
    conn: Conn,
    target: str,
    base: str,
    pgid: int,
    connections: int,
    seconds: float,
    outcome: Outcome,
) -> dict[str, Any]:
    count_sql, queue = _COUNTS[target]
    requests_file = w.tmp / f"wrk-{target}-{connections}.txt"
    wrk.write_requests(requests_file, int(seconds * MAX_RATE) + 500, WEBHOOK_SECRET)
    stored_before, queued_before = scalar(conn, count_sql), rabbit.depth(w.broker_url, queue)
    cpu_before = group_cpu_seconds(pgid)
    result = wrk.run(base, requests_file, connections, seconds)
    ended = time.monotonic()
    time.sleep(0.3)  # requests in flight when wrk stopped finish
    stored = scalar(conn, count_sql) - stored_before
    # payfleet publishes after answering: wait until what it stored is queued
    # (up to 30 s), and count that time and CPU too, so a publisher that
    # falls behind shows in the figures instead of hiding after the run.
    deadline = ended + 30
    while rabbit.depth(w.broker_url, queue) - queued_before < stored and time.monotonic() < deadline:
        time.sleep(0.05)
    lag = max(0.0, time.monotonic() - ended - 0.3)
    cpu = group_cpu_seconds(pgid) - cpu_before
    queued = rabbit.depth(w.broker_url, queue) - queued_before
    requests_file.unlink()
    figures = {
        # Requests over the run plus the time it took to queue them all.
        "req_s": round(result.requests / (result.seconds + lag), 1),
        "queued_after_s": round(lag, 2),
        "p50_ms": round(result.p50_ms, 2),
        "p99_ms": round(result.p99_ms, 2),
        "max_ms": round(result.max_ms, 1),
        "cpu_ms_per_req": round(1000 * cpu / max(1, result.requests), 3),
        "requests": result.requests,
        "non_2xx": result.non_2xx,
        "socket_errors": result.socket_errors,
        "stored": stored,
        "queued": queued,
    }
    label = f"{target} @{connections}c"
    outcome.check(f"{label}: no non-2xx, no socket error", result.non_2xx == 0 and result.socket_errors == 0)
    outcome.check(f"{label}: no event sent twice", result.wrapped == 0, f"{result.wrapped} wraps")
    # A request wrk gave up on at the end may still have been stored: at most one per connection.
    outcome.check(
        f"{label}: every 2xx stored",
        result.ok <= stored <= result.ok + connections,
        f"{stored} rows, {result.ok} 2xx",
    )
    outcome.check(f"{label}: every stored event queued once", queued == stored, f"{queued} queued")
    if target == "payfleet":
        unpublished = scalar(conn, "SELECT count(*) FROM provider_events WHERE published_at IS NULL")
        outcome.check(f"{label}: none left to the relay", unpublished == 0, f"{unpublished} unpublished")
    return figures
