"""The world of one scenario: its own PostgreSQL database and RabbitMQ vhost
(removed at the end, so a running fleet is untouched), and payfleet's
processes started through the `payfleet` command with environment variables
only: the bench depends on no module path inside payfleet."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests

from bench.procs import Proc, ProcessGroup, wait_until

PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_HOST = "127.0.0.1"
AMQP_PORT = 5672
AMQP_USER = AMQP_PASSWORD = "guest"
MANAGEMENT_URL = "http://127.0.0.1:15672"
ADMIN_TOKEN = "bench-admin-token"
WEBHOOK_SECRET = "whsec_bench"
STRIPE_KEY = "sk_test_bench"
BENCH_ROOT = Path(__file__).resolve().parent.parent
# payfleet's own packages (pyproject.toml's packages.find).
PACKAGES = ("payfleet", "ingress", "workers", "domain", "schedules")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)


def amqp_url(vhost: str, port: int = AMQP_PORT) -> str:
    quoted = urllib.parse.quote(vhost, safe="")
    return f"amqp://{AMQP_USER}:{AMQP_PASSWORD}@{AMQP_HOST}:{port}/{quoted}"


@dataclass(frozen=True)
class Payfleet:
    """Where the `payfleet` command and its sources are. `root` is the
    checkout whose packages the processes import (by default this one)."""

    root: Path
    command: Path

    @classmethod
    def at(cls, root: Path | None) -> Payfleet:
        base = (root or BENCH_ROOT).resolve()
        command = base / ".venv" / "bin" / "payfleet"
        if not command.exists():
            command = BENCH_ROOT / ".venv" / "bin" / "payfleet"
        return cls(base, command)

    def compile(self) -> None:
        """Write the sources' bytecode, as the image's `pip install .` does.
        An editable checkout run with PYTHONDONTWRITEBYTECODE=1 (this machine
        sets it) would otherwise compile payfleet's modules again in every
        process it starts: ~0.3 s of each worker process's start."""
        dirs = [str(self.root / name) for name in PACKAGES] + [str(BENCH_ROOT / "bench")]
        subprocess.run([str(self.command.parent / "python"), "-m", "compileall", "-q", *dirs], check=True)


@dataclass
class World:
    """One scenario's database, vhost, temp dir and processes."""

    name: str
    payfleet: Payfleet
    tmp: Path
    procs: ProcessGroup
    stripe_api_base: str = "http://127.0.0.1:9"  # nothing listens: no scenario without a fake calls it
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def database(self) -> str:
        return self.name

    @property
    def vhost(self) -> str:
        return self.name

    @property
    def dsn(self) -> str:
        """For psycopg."""
        return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{self.database}"

    @property
    def database_url(self) -> str:
        """For payfleet (SQLAlchemy)."""
        return self.dsn.replace("postgresql://", "postgresql+psycopg://", 1)

    @property
    def broker_url(self) -> str:
        return amqp_url(self.vhost)

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment of a payfleet process of this world."""
        metrics = Path(tempfile.mkdtemp(prefix="metrics-", dir=self.tmp))
        prom_port = str(free_port())
        env = {
            **os.environ,
            "PYTHONPATH": str(self.payfleet.root),
            "PYTHONUNBUFFERED": "1",
            "DATABASE_URL": self.database_url,
            "BROKER_URL": self.broker_url,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "STRIPE_API_KEY": STRIPE_KEY,
            "STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET,
            "STRIPE_API_BASE": self.stripe_api_base,
            "SCHEDULER_METRICS_PORT": "0",
            "METRICS_HOST": "127.0.0.1",
            "WORKER_METRICS_PORT": prom_port,
            "dramatiq_prom_host": "127.0.0.1",
            "dramatiq_prom_port": prom_port,
            "dramatiq_prom_db": str(metrics),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
            "WEB_CONCURRENCY": os.environ.get("WEB_CONCURRENCY", "2"),
            **self.extra_env,
        }
        env.update(overrides)
        return env

    def payfleet_cmd(self, name: str, *args: str, **env: str) -> Proc:
        argv = [str(self.payfleet.command), *args]
        return self.procs.spawn(name, argv, self.env(**env), cwd=self.payfleet.root)

    def ingress(self, broker_url: str | None = None, **env: str) -> str:
        """Start the ingress; returns its base URL once /readyz answers 200."""
        port = free_port()
        if broker_url is not None:
            env["BROKER_URL"] = broker_url
        proc = self.payfleet_cmd("ingress", "ingress", "--bind", f"127.0.0.1:{port}", **env)
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base}/readyz", proc, 60)
        return base

    def worker(self, processes: int, threads: int, **env: str) -> Proc:
        args = ("worker", "--processes", str(processes), "--threads", str(threads))
        return self.payfleet_cmd("worker", *args, **env)

    def scheduler(self, broker_url: str | None = None, **env: str) -> Proc:
        if broker_url is not None:
            env["BROKER_URL"] = broker_url
        return self.payfleet_cmd("scheduler", "scheduler", **env)

    def migrate(self) -> None:
        env = self.env()
        done = subprocess.run(
            [str(self.payfleet.command), "migrate"],
            env=env,
            cwd=self.payfleet.root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"payfleet migrate failed: {done.stderr[-2000:]}")

    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.dsn, autocommit=True)


def wait_http_ok(url: str, proc: Proc, timeout: float) -> None:
    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}); see {proc.log}")
        try:
            return requests.get(url, timeout=5).status_code == 200
        except requests.RequestException:
            return False

    wait_until(ready, timeout, 0.2, f"{url} answering 200")


class Template:
    """A migrated database made once per bench run; each scenario's database
    is a copy of it (CREATE DATABASE … TEMPLATE), which takes a second."""

    def __init__(self, payfleet: Payfleet, run_id: str, tmp: Path) -> None:
        self.payfleet, self.name, self.tmp = payfleet, f"{run_id}_template", tmp
        self.ready = self.created = False

    def ensure(self) -> None:
        if self.ready:
            return
        _create_database(self.name)
        self.created = True
        world = World(self.name, self.payfleet, self.tmp, ProcessGroup(self.tmp))
        world.migrate()
        self.ready = True

    def drop(self) -> None:
        if self.created:
            _drop_database(self.name)


def _create_database(name: str, template: str | None = None) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        suffix = f' TEMPLATE "{template}"' if template else ""
        admin.execute(f'CREATE DATABASE "{name}"{suffix}')


def _drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def world(template: Template, scenario: str, extra_env: Mapping[str, str] | None = None) -> Iterator[World]:
    """A scenario's world; everything it started is stopped and removed on the way out."""
    template.ensure()
    name = f"{template.name.removesuffix('_template')}_{scenario}"
    tmp = template.tmp / scenario
    tmp.mkdir(parents=True, exist_ok=True)
    procs = ProcessGroup(tmp)
    _create_database(name, template.name)
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, AMQP_USER, ".*", ".*", ".*")
        yield World(name, template.payfleet, tmp, procs, extra_env=dict(extra_env or {}))
    finally:
        procs.stop_all()
        _drop_database(name)
        rabbitmqctl("delete_vhost", name)
