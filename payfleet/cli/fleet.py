"""Running the fleet: `payfleet up|ingress|worker|scheduler|migrate`."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from payfleet import sandbox
from payfleet.platform import logs
from payfleet.platform.config import Settings, child_environment
from payfleet.platform.publishing import QUEUES


def _ingress(settings: Settings, args: argparse.Namespace) -> int:
    command = [
        sys.executable, "-m", "gunicorn",
        "--config", "python:ingress.gunicorn_conf",
        "--bind", args.bind,
        "ingress.app:get_app()",
    ]  # fmt: skip
    os.execv(sys.executable, command)


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    # Dramatiq's supervisor runs in this process, which has already imported
    # much of what its forked worker processes need: no second interpreter
    # start and no second import of the settings, logs and broker modules
    # (the exec into `python -m payfleet.platform.logs` it replaces cost
    # ~0.2 s of a worker's start).
    # The worker's metrics exporter (workers/metrics.py) reads its port and
    # host from the settings itself.
    argv = [
        "workers.main",
        "--processes", str(args.processes),
        "--threads", str(args.threads),
        "--queues", *QUEUES,
    ]  # fmt: skip
    return logs.run_dramatiq(settings.log_format, argv)


def _scheduler(settings: Settings, args: argparse.Namespace) -> int:
    from schedules.scheduler import main

    main(settings)
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from payfleet.platform.db import migrate

    migrate(settings.database_url)
    print("database migrated to the latest revision")
    return 0


def _up(settings: Settings, args: argparse.Namespace) -> int:
    """The whole fleet in the foreground: migrate, then ingress, worker and
    scheduler as child processes. Ctrl-C (or any child dying) stops them all.
    With no provider key at all, the local sandbox stands in for Stripe and
    Monetbil and runs beside them, so the whole payment path can be seen."""
    _migrate(settings, args)
    me = [sys.executable, "-m", "payfleet.cli"]
    commands = []
    env = None  # the children inherit this environment
    if sandbox.wanted(settings.stripe_api_key, settings.monetbil_service_key):
        print(sandbox.NOTICE, flush=True)
        env = child_environment(_sandbox_settings(settings, args.bind))
        commands.append([*me, "sandbox", "--webhook-url", _local_url(args.bind)])
    commands += [
        [*me, "ingress", "--bind", args.bind],
        [*me, "worker", "--processes", str(args.processes), "--threads", str(args.threads)],
        [*me, "scheduler"],
    ]
    # The children (and the processes they fork) share one process group of
    # their own, not up's: a terminal's Ctrl-C, which signals its whole
    # foreground group, then reaches `up` alone, and `up` tells each child
    # once. Told twice, Dramatiq's supervisor forwards the second signal too,
    # and a worker process told twice exits at once instead of finishing the
    # messages it holds.
    children: list[subprocess.Popen[bytes]] = []
    for command in commands:
        group = children[0].pid if children else 0
        children.append(subprocess.Popen(command, env=env, process_group=group))
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    return _stop_all(children)


def _sandbox_settings(settings: Settings, bind: str) -> dict[str, str]:
    """What the children are told besides this environment: the sandbox's
    addresses, keys and this run's webhook secrets."""
    extra = sandbox.environment(settings.sandbox_bind)
    if settings.public_base_url == Settings.public_base_url:
        # Monetbil's callbacks go to PUBLIC_BASE_URL: by default, this ingress.
        extra["PUBLIC_BASE_URL"] = _local_url(bind)
    return extra


def _local_url(bind: str) -> str:
    host, _, port = bind.rpartition(":")
    return f"http://{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{port}"


def _stop_all(children: Sequence[subprocess.Popen[bytes]]) -> int:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    # Whatever a child forked and left behind (it was killed, say) goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(children[0].pid, signal.SIGKILL)
    return max((abs(child.returncode or 0) for child in children), default=0)


def add_commands(commands: Any) -> None:
    def worker_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
        # Eight, as Dramatiq's own default: a process applies the events its
        # threads hold at once as one batch, so twice the threads drained
        # about 1.45 times the events a second (bench/README, ninth round).
        command.add_argument("--threads", type=int, default=8, help="threads per process (default 8)")

    up = commands.add_parser("up", help="run the whole fleet in the foreground")
    up.add_argument("--bind", default="127.0.0.1:8000", help="ingress address (default 127.0.0.1:8000)")
    worker_options(up)
    up.set_defaults(run=_up)
    ingress = commands.add_parser("ingress", help="run the HTTP ingress under gunicorn")
    ingress.add_argument("--bind", default="127.0.0.1:8000", help="HOST:PORT (default 127.0.0.1:8000)")
    ingress.set_defaults(run=_ingress)
    worker = commands.add_parser("worker", help="run Dramatiq workers")
    worker_options(worker)
    worker.set_defaults(run=_worker)
    commands.add_parser("scheduler", help="run the scheduler and outbox relay").set_defaults(run=_scheduler)
    commands.add_parser("migrate", help="migrate the database to the latest schema").set_defaults(
        run=_migrate
    )
