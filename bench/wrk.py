"""wrk with pre-signed webhooks: a file of unique signed events (timestamps
of now, so within the 300 s tolerance) and a Lua script that cycles through
it; figures come back as JSON from the script's done()."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench import events

LUA = Path(__file__).with_name("wrk.lua")


@dataclass(frozen=True)
class WrkResult:
    connections: int
    seconds: float
    requests: int
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    wrapped: int

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk, or `make bench` installs it)")
    return found


def write_requests(path: Path, count: int, secret: str) -> None:
    """`count` unique signed `payment_intent.succeeded` events (for intents
    nobody knows: the ingress stores them all the same)."""
    with open(path, "w") as out:
        for i in range(count):
            event = events.intent_event(f"pi_wrk_{i}", 1500, {})
            body = events.encode(event)
            out.write(f"{events.signed(body, secret)}\t{body.decode()}\n")


def run(
    base_url: str, requests_file: Path, connections: int, seconds: float, path: str = "/webhooks/stripe"
) -> WrkResult:
    threads = min(2, connections)
    argv = [
        wrk_binary(),
        "-t", str(threads),
        "-c", str(connections),
        "-d", f"{max(1, round(seconds))}s",
        "--timeout", "10s",
        "--latency",
        "-s", str(LUA),
        f"{base_url}{path}",
        "--", str(requests_file), str(threads), path,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-1500:]} {done.stderr[-1500:]}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    return WrkResult(
        connections=connections,
        seconds=data["duration_us"] / 1e6,
        requests=data["requests"],
        non_2xx=data["status"],
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        wrapped=data["wrapped"],
    )
