"""`payfleet demo` says what it could not do and exits non-zero; its passing
run against a sandbox fleet is in tests/test_sandbox_fleet.py."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import free_port


def _demo(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "payfleet.cli", "demo", *args],
        env={**os.environ, "ADMIN_TOKEN": "", **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",  # no .admin-token here
    )


def test_without_an_admin_token_it_says_where_to_find_one():
    run = _demo()
    assert run.returncode == 2
    assert "no admin token" in run.stderr and ".admin-token" in run.stderr


def test_with_no_fleet_it_fails_at_the_first_step_and_says_so():
    url, sandbox = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    run = _demo("--url", url, "--sandbox", sandbox, "--token", "t")
    assert run.returncode == 1
    assert "[1/12] the fleet and the sandbox answer" in run.stdout
    assert f"FAILED: GET {url}/readyz: no answer" in run.stdout
    assert "demo failed at step 1" in run.stdout and "[2/12]" not in run.stdout
