"""The fleet under chaos: real `payfleet` processes (ingress, worker, two
schedulers) whose every PostgreSQL and RabbitMQ connection goes through a
TCP proxy the scenarios cut, while the test itself reads the books over
direct connections."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench.procs import Proc, ProcessGroup
from tests.conftest import free_port
from tests.support.tcp_proxy import TcpProxy

WORKER_ARGS = ("worker", "--processes", "1", "--threads", "4")


@dataclass
class Fleet:
    """Every process started here runs in its own process group (gunicorn's
    and Dramatiq's forks go down with it) and logs to a file of its own
    (bench.procs, which the benchmarks start their processes with too)."""

    env: dict[str, str]
    logs: Path
    pg: TcpProxy
    amqp: TcpProxy
    base: str = ""
    worker: Proc | None = None
    group: ProcessGroup = field(init=False)

    def __post_init__(self) -> None:
        self.group = ProcessGroup(self.logs)

    @property
    def procs(self) -> list[Proc]:
        return self.group.started

    def spawn(self, name: str, *args: str, **env: str) -> Proc:
        argv = [sys.executable, "-m", "payfleet.cli", *args]
        return self.group.spawn(
            f"{name}-{len(self.procs)}", argv, {**os.environ, **self.env, **env}, Path.cwd()
        )

    def start_ingress(self) -> None:
        port = free_port()
        proc = self.spawn("ingress", "ingress", "--bind", f"127.0.0.1:{port}")
        self.base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(f"{self.base}/readyz", proc), 60, "the ingress answering /readyz")

    def start_worker(self) -> Proc:
        # A port of its own per start: the killed one's exporter may linger a moment.
        self.worker = self.spawn("worker", *WORKER_ARGS, WORKER_METRICS_PORT=str(free_port()))
        return self.worker

    def kill_worker(self) -> None:
        """SIGKILL the worker's whole process group: no handler runs, no
        message is acked, open transactions are left to PostgreSQL."""
        assert self.worker is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.worker.popen.pid, signal.SIGKILL)
        self.worker.popen.wait(10)
        self.procs.remove(self.worker)
        self.worker = None

    def exited(self) -> list[str]:
        """The processes that should be running and are not, with their last words."""
        return [f"{p.name} exited {p.popen.returncode}:\n{p.tail()}" for p in self.procs if not p.alive()]

    def stop(self) -> None:
        self.group.stop_all()


def _answers(url: str, proc: Proc) -> bool:
    if not proc.alive():
        raise RuntimeError(f"{proc.name} exited before answering:\n{proc.tail()}")
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def wait_for(check: object, timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll `check()` until truthy; returns the seconds it took."""
    assert callable(check)
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - started


@contextlib.contextmanager
def proxies() -> Iterator[tuple[TcpProxy, TcpProxy]]:
    # Roomy: two gunicorn workers, a worker and two schedulers each keep pools open.
    with (
        TcpProxy("127.0.0.1", 5432, max_connections=512) as pg,
        TcpProxy("127.0.0.1", 5672, max_connections=512) as amqp,
    ):
        yield pg, amqp


def fleet_env(base: Mapping[str, str], pg: TcpProxy, amqp: TcpProxy) -> dict[str, str]:
    return {
        **base,
        "DATABASE_URL": pg.url_for(base["DATABASE_URL"]),
        "BROKER_URL": amqp.url_for(base["BROKER_URL"]),
    }
