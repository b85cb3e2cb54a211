"""docker-compose.yml against the Compose Specification's JSON schema, with
check-jsonschema's vendored copy (a dev dependency: always runs, no network).
Debian's docker-compose 1.29 predates the specification and rejects its
top-level `name`, so it cannot be the judge."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_compose_file_follows_the_compose_specification():
    result = _check(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


def test_the_check_refuses_a_file_that_breaks_the_specification(tmp_path):
    # The check is not vacuous: a misspelt service key is refused.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  ingress:\n    imagee: payfleet\n")
    result = _check(broken)
    assert result.returncode != 0
    assert "imagee" in result.stdout + result.stderr
