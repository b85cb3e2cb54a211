"""Scenario 5, outage: webhooks at 16 connections while the ingress's
RabbitMQ is cut for a while (a TCP proxy between them). wrk runs before,
during and after the cut; the answer latencies of each phase are reported.
Afterwards a scheduler's relay (through the same proxy) must publish every
stored event once RabbitMQ is back."""

from __future__ import annotations

import time

from bench import rabbit, wrk
from bench.fleet import AMQP_HOST, AMQP_PORT, WEBHOOK_SECRET, world
from bench.procs import wait_until
from bench.report import Outcome
from bench.scenarios import Context
from bench.scenarios.common import count, scalar
from tests.support.tcp_proxy import TcpProxy

CONNECTIONS = 16
MAX_RATE = 3000


def run(ctx: Context, outcome: Outcome) -> None:
    p = ctx.params
    relay = {} if p.relay_interval is None else {"OUTBOX_RELAY_INTERVAL_SECONDS": str(p.relay_interval)}
    with (
        world(ctx.template, "outage", relay) as w,
        w.connect() as conn,
        TcpProxy(AMQP_HOST, AMQP_PORT) as proxy,
    ):
        through_proxy = proxy.url_for(w.broker_url)
        base = w.ingress(broker_url=through_proxy)
        w.scheduler(broker_url=through_proxy)
        phases = (("before", p.outage_before, proxy.cut), ("during cut", p.outage_cut, proxy.restore))
        for name, seconds, then in (*phases, ("after", p.outage_after, lambda: None)):
            requests_file = w.tmp / f"wrk-{name}.txt"
            wrk.write_requests(requests_file, int(seconds * MAX_RATE) + 500, WEBHOOK_SECRET)
            result = wrk.run(base, requests_file, CONNECTIONS, seconds)
            then()
            requests_file.unlink()
            outcome.figures[name] = {
                "req_s": round(result.rps, 1),
                "p50_ms": round(result.p50_ms, 1),
                "p99_ms": round(result.p99_ms, 1),
                "max_ms": round(result.max_ms, 1),
                "requests": result.requests,
                "non_2xx": result.non_2xx,
                "socket_errors": result.socket_errors,
            }
            outcome.check(f"{name}: every answer 2xx", result.non_2xx == 0 and result.socket_errors == 0)
            if name == "during cut":
                outcome.ratios["p99 during cut ÷ 1 s promise"] = round(result.p99_ms / 1000, 3)
                if result.requests == 0:
                    outcome.notes.append(f"no webhook was answered during the {seconds:.0f} s cut")
        outcome.figures["left_to_relay_after_cut"] = scalar(
            conn, "SELECT count(*) FROM provider_events WHERE published_at IS NULL"
        )
        started = time.monotonic()
        unpublished = "SELECT count(*) FROM provider_events WHERE published_at IS NULL"
        wait_until(lambda: count(conn, unpublished) == 0, 120, 0.5, "relay published every stored event")
        outcome.figures["relay_catch_up_seconds"] = round(time.monotonic() - started, 1)
        time.sleep(2.0)  # answers the ingress was still writing when wrk stopped
        wait_until(lambda: count(conn, unpublished) == 0, 60, 0.5, "relay published the late ones too")
        stored = count(conn, "SELECT count(*) FROM provider_events")
        queued = rabbit.drain_args(w.broker_url, "payments", limit=stored * 3 + 100)
        ids = {int(row[0]) for row in conn.execute("SELECT id FROM provider_events").fetchall()}
        missing = ids - set(queued)
        outcome.figures["stored"] = stored
        outcome.figures["messages"] = len(queued)
        outcome.figures["duplicate_messages"] = len(queued) - len(set(queued))
        outcome.check("every stored event published", not missing, f"{len(missing)} never published")
