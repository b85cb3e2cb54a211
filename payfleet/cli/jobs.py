"""`payfleet jobs list|run NAME [--wait]|runs`: the maintenance jobs by hand."""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from typing import Any

from domain import job_runs
from domain.job_runs import job_overview
from payfleet.cli import print_json
from payfleet.platform.broker import build_broker
from payfleet.platform.config import Settings, job_table
from payfleet.platform.db import engine_for, make_sessions
from payfleet.platform.outbox import start_manual_run
from payfleet.platform.publishing import Publisher


def _list(settings: Settings, args: argparse.Namespace) -> int:
    with make_sessions(engine_for(settings))() as session:
        print_json(job_overview(session, job_table(settings), datetime.now(UTC)))
    return 0


def _runs(settings: Settings, args: argparse.Namespace) -> int:
    with make_sessions(engine_for(settings))() as session:
        print_json(job_runs.list_runs(session, job=args.job, limit=args.limit))
    return 0


def _run(settings: Settings, args: argparse.Namespace) -> int:
    table = job_table(settings)
    if table.get(args.name) is None:
        print(f"payfleet: no job {args.name!r}; jobs: {', '.join(table.names)}")
        return 2
    sessions = make_sessions(engine_for(settings))
    broker = build_broker(settings)
    run_id, published = start_manual_run(sessions, Publisher(broker), table, args.name)
    broker.close()
    print(f"run {run_id} of {args.name} queued" + ("" if published else " (published by the scheduler)"))
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        with sessions() as session:
            run = job_runs.get(session, run_id)
        if run and run["state"] in job_runs.FINISHED:
            print_json(run)
            return 0 if run["state"] == "succeeded" else 1
        time.sleep(0.2)
    print(f"payfleet: run {run_id} not finished after {args.timeout}s (is a worker consuming 'jobs'?)")
    return 1


def add_commands(commands: Any) -> None:
    jobs = commands.add_parser("jobs", help="the scheduled maintenance jobs").add_subparsers(
        dest="action", required=True
    )
    jobs.add_parser("list", help="schedules, next and last runs").set_defaults(run=_list)
    run = jobs.add_parser("run", help="start a job now (a manual run)")
    run.add_argument("name")
    run.add_argument(
        "--wait", action="store_true", help="wait for the run to finish; exit 1 unless it succeeded"
    )
    run.add_argument("--timeout", type=float, default=900, help="longest wait in seconds (default 900)")
    run.set_defaults(run=_run)
    history = jobs.add_parser("runs", help="recent runs, newest first")
    history.add_argument("--job")
    history.add_argument("--limit", type=int, default=50)
    history.set_defaults(run=_runs)
