"""`payfleet up` with provider keys set leaves the sandbox out and says
nothing about it: the real providers are meant."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import requests

from tests.conftest import eventually, free_port
from tests.support.processes import kill_up

pytestmark = pytest.mark.e2e


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False


def test_up_with_keys_starts_no_sandbox(env, tmp_path):
    port, sandbox = free_port(), free_port()
    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "payfleet.cli", "up", "--bind", f"127.0.0.1:{port}", "--processes", "1"],
            env={
                **os.environ,
                **env,
                "SANDBOX_BIND": f"127.0.0.1:{sandbox}",
                "WORKER_METRICS_PORT": str(free_port()),
                "SCHEDULER_METRICS_PORT": str(free_port()),
            },
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        eventually(lambda: _answers(f"http://127.0.0.1:{port}/readyz"), timeout=60, interval=0.2)
        assert not _answers(f"http://127.0.0.1:{sandbox}/sandbox")
        up.send_signal(signal.SIGINT)
        assert up.wait(40) == 0
    finally:
        if up.poll() is None:
            kill_up(up)
    assert "sandbox providers" not in log.read_text()
