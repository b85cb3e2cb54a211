"""payfleet's own processes started by a test: `payfleet <args>` as a real
process group, its stdout and stderr kept in one file, stopped at the end
(SIGTERM to its leader, then SIGKILL to the group; see bench.procs)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from bench.procs import stop_group

Process = subprocess.Popen[bytes]
Start = Callable[..., tuple[Process, Path]]


@contextmanager
def payfleet_processes(env: Mapping[str, str], logs: Path, **defaults: str) -> Iterator[Start]:
    """Yields `start(*args, **env)`, which runs `payfleet <args>` with the
    test's environment, `defaults` and `env` over it, and returns the process
    and the file its output goes to (`<command>-<n>.log` in `logs`)."""
    started: list[Process] = []

    def start(*args: str, **extra_env: str) -> tuple[Process, Path]:
        log = logs / f"{args[0]}-{len(started)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "payfleet.cli", *args],
                env={**os.environ, **env, **defaults, **extra_env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(process)
        return process, log

    try:
        yield start
    finally:
        for process in started:
            stop(process)


def stop(process: Process) -> None:
    stop_group(process, 20)


def kill_up(up: Process) -> None:
    """SIGKILL `payfleet up` and all it started: its children run in a
    process group of their own, not up's (payfleet/cli/fleet.py)."""
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{up.pid}/task/{up.pid}/children").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(int(child)), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(up.pid, signal.SIGKILL)
    up.wait()
