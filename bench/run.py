"""Run the benchmark scenarios and print their figures, each with its
reference measured in the same run.

    .venv/bin/python -m bench.run --scale smoke
    .venv/bin/python -m bench.run --scenario ingest --scenario apply --json bench-results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from bench import rabbit
from bench.fleet import Payfleet, Template
from bench.params import Params, for_scale
from bench.report import Outcome, log_trouble, render
from bench.scenarios import Context, load

ORDER = ("ingest", "apply", "expire", "backlog", "outage", "soak")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__)
    add = parser.add_argument
    add("--scenario", action="append", choices=ORDER, help="repeatable; default: all, in order")
    add("--scale", choices=("smoke", "full"), default="full", help="smoke: seconds, no speed claims")
    add("--json", type=Path, help="also write the results to this file")
    add("--payfleet-root", type=Path, help="checkout whose packages payfleet's processes import")
    add("--keep-logs", action="store_true", help="keep the processes' logs (printed path)")
    add("--processes", type=int, help="worker processes (default 2)")
    add("--threads", type=int, help="worker threads per process (default 8)")
    add("--ingest-seconds", type=float)
    add("--ingest-rounds", type=int, help="rounds per server and connection count (default 3)")
    add("--apply-events", type=int)
    add("--apply-rounds", type=int, help="rounds per apply variant and its no-op (default 3)")
    add("--expire-orders", type=int)
    add("--expire-slow-orders", type=int, help="orders of the rate-limited and 50 ms variants")
    add(
        "--expire-variant",
        action="append",
        type=_variant,
        dest="expire_variants",
        metavar="LATENCY_MS:RPS",
        help="repeatable, e.g. 0:100000 (unlimited); default: the scale's variants",
    )
    add("--backlog-events", type=int)
    add("--relay-interval", type=float, help="OUTBOX_RELAY_INTERVAL_SECONDS for backlog and outage")
    add("--outage-cut", type=float)
    add("--soak-seconds", type=float)
    add("--soak-rate", type=float)
    return parser


def _variant(text: str) -> tuple[int, int]:
    latency, _, rps = text.partition(":")
    try:
        return int(latency), int(rps)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LATENCY_MS:RPS, got {text!r}") from None


def _params(args: argparse.Namespace) -> Params:
    params = for_scale(args.scale)
    overrides = {
        name: getattr(args, name)
        for name in (
            "processes",
            "threads",
            "ingest_seconds",
            "ingest_rounds",
            "apply_events",
            "apply_rounds",
            "expire_orders",
            "expire_slow_orders",
            "expire_variants",
            "backlog_events",
            "relay_interval",
            "outage_cut",
            "soak_seconds",
            "soak_rate",
        )
        if getattr(args, name) is not None
    }
    if "expire_variants" in overrides:
        overrides["expire_variants"] = tuple(overrides["expire_variants"])
    return replace(params, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    params = _params(args)
    chosen = [name for name in ORDER if name in (args.scenario or ORDER)]
    run_id = f"payfleet_bench_{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{run_id}-"))
    payfleet = Payfleet.at(args.payfleet_root)
    payfleet.compile()
    template = Template(payfleet, run_id, tmp)
    print(f"bench {run_id}: scale {args.scale}, scenarios {', '.join(chosen)}, logs in {tmp}", flush=True)
    if not rabbit.management_available():
        print("note: RabbitMQ management API unreachable; publish counters are skipped", flush=True)
    outcomes: list[Outcome] = []
    try:
        for name in chosen:
            outcome = Outcome(name)
            started = time.monotonic()
            try:
                load(name)(Context(template, params), outcome)
            except Exception as error:
                outcome.error = f"{type(error).__name__}: {error}"
                traceback.print_exc()
            outcome.seconds = time.monotonic() - started
            outcome.notes.extend(log_trouble(tmp / name) + _sub_logs(tmp, name))
            outcomes.append(outcome)
            print(render(outcome), flush=True)
    finally:
        template.drop()
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(_document(args.scale, params, outcomes), indent=2) + "\n")
    failed = [o.scenario for o in outcomes if not o.ok]
    print(f"bench done: {len(outcomes) - len(failed)} ok, failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


def _sub_logs(tmp: Path, name: str) -> list[str]:
    """Scenarios with variants keep each variant's logs in `<name>_<variant>`."""
    notes: list[str] = []
    for sub in sorted(tmp.glob(f"{name}_*")):
        notes.extend(f"{sub.name}/{note}" for note in log_trouble(sub))
    return notes


def _document(scale: str, params: Params, outcomes: list[Outcome]) -> dict[str, object]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "scale": scale,
        "params": {k: v for k, v in vars(params).items()},
        "results": [o.as_json() for o in outcomes],
    }


if __name__ == "__main__":
    sys.exit(main())
