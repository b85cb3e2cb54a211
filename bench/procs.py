"""Child processes of a bench run: each in its own process group (so gunicorn
and Dramatiq's forks go down with it), its output in a log file, and what
/proc says about the whole group: CPU time and resident memory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        """Its log's last lines ("" when there is none)."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass
class ProcessGroup:
    """Every process started here is stopped by `stop_all`, whatever happened."""

    log_dir: Path
    started: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> Proc:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 20.0) -> None:
        stop_group(proc.popen, grace)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            stop_group(proc.popen, 20.0)
        self.started.clear()


def stop_group(popen: subprocess.Popen[bytes], grace: float) -> None:
    stop_groups([popen], grace)


def stop_groups(popens: Sequence[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM to each group's leader, as a container runtime or an init
    sends it, then SIGKILL to whatever is left of each group. The leader
    stops its own children: Dramatiq's supervisor forwards the signal,
    gunicorn's master stops its workers. Signalled by the group as well, a
    Dramatiq worker process would be told twice and exit at once instead of
    finishing the messages it holds."""
    for popen in popens:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for popen in popens:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(max(0.1, deadline - time.monotonic()))
    for popen in popens:
        # The leader may be gone while forks of it live on in its group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(5)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may hold spaces; everything after its closing parenthesis is fixed.
    return raw[raw.rindex(")") + 2 :].split()


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process of the group (fields 14, 15)."""
    ticks = 0
    for pid in group_pids(pgid):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def group_rss_bytes(pgid: int) -> int:
    total = 0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    return total


class RssSampler:
    """Peak summed RSS of a process group, sampled on demand."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.peak = 0
        self.samples = 0

    def sample(self) -> int:
        rss = group_rss_bytes(self.pgid)
        self.peak = max(self.peak, rss)
        self.samples += 1
        return rss


def wait_until(
    check: Callable[[], object], timeout: float, interval: float = 0.2, what: str = "condition"
) -> None:
    """Poll `check()` until it is truthy; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(interval)
