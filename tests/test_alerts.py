"""Alerts: every rule in deploy/prometheus/alerts.yml links a runbook page that
exists and is unit-tested by promtool (Debian's `prometheus` package; those
tests skip only where promtool is absent, and `make test` installs it where
apt is available); and the figures the new rules read are exported by the
scheduler, read from PostgreSQL."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

from bench.procs import stop_group
from domain.models import ScheduledRun
from schedules.fleet_gauges import FleetGauges
from tests.conftest import eventually, free_port
from tests.support.shop import deliver, place, put_product
from tests.support.stripe_signing import stripe_event

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
RUNBOOKS = ROOT / "deploy" / "runbooks"
RULE_TESTS = ("alerts_test.yml", "alerts_slow_test.yml")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool absent (apt-get install prometheus)")


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_links_its_own_runbook_page():
    alerts = _alerts()
    pages = {rule["annotations"]["runbook_url"] for rule in alerts}
    assert len(pages) == len(alerts), "two alerts share a page"
    for rule in alerts:
        url = rule["annotations"]["runbook_url"]
        page = ROOT / url
        assert url.startswith("deploy/runbooks/") and page.is_file(), (rule["alert"], url)
        body = page.read_text()
        assert body.startswith(f"# {rule['alert']}\n"), url
        for section in ("## What it means", "## What to look at", "## Fix"):
            assert section in body, (url, section)
        assert "```sh\n" in body, f"{url} shows no command to run"


def test_every_runbook_page_belongs_to_an_alert():
    linked = {Path(rule["annotations"]["runbook_url"]).name for rule in _alerts()}
    pages = {page.name for page in RUNBOOKS.glob("*.md")} - {"README.md"}
    assert pages == linked
    index = (RUNBOOKS / "README.md").read_text()
    assert all(f"| {rule['alert']} |" in index for rule in _alerts())


def test_every_alert_has_a_rule_test_where_it_fires():
    fired = set()
    for name in RULE_TESTS:
        for case in yaml.safe_load((PROMETHEUS / name).read_text())["tests"]:
            fired |= {check["alertname"] for check in case["alert_rule_test"] if check.get("exp_alerts")}
    assert {rule["alert"] for rule in _alerts()} <= fired


@needs_promtool
def test_promtool_checks_the_rules():
    result = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(PROMETHEUS / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


@needs_promtool
def test_promtool_rule_unit_tests_pass():
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", *RULE_TESTS],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


# --- the figures the rules read ---------------------------------------------------


def _samples(exposition: str) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in re.findall(r"^(payfleet_[^\s]+) ([-0-9.e+]+)$", exposition, re.MULTILINE)
    }


def _seed(client, sessions) -> None:
    """One event left unapplied (no worker runs), one settled failed, one
    order in needs_attention, a failed run and a skipped slot."""
    assert deliver(client, stripe_event("customer.created", {"id": "cus_1"})).status_code == 200
    assert deliver(client, stripe_event("customer.updated", {"id": "cus_1"})).status_code == 200
    order_id, _ = place(client, ("MUG", 1))
    with sessions.begin() as session:
        session.execute(
            text(
                "UPDATE provider_events SET status = 'failed', processed_at = now()"
                " WHERE event_type = 'customer.updated'"
            )
        )
        session.execute(text("UPDATE provider_events SET received_at = now() - interval '90 seconds'"))
        session.execute(text("UPDATE orders SET status = 'needs_attention' WHERE id = :id"), {"id": order_id})
        slot = datetime(2026, 11, 30, 8, tzinfo=UTC)
        session.add(ScheduledRun(job="expire-stale-orders", slot=slot, trigger="scheduled", state="failed"))
        session.add(ScheduledRun(job="request-reviews", slot=slot, trigger="scheduled", state="skipped"))


def test_fleet_gauges_read_postgresql(client, sessions):
    put_product(client, "MUG", on_hand=3)
    _seed(client, sessions)
    registry = CollectorRegistry()
    registry.register(FleetGauges(sessions, ["expire-stale-orders", "clean-expired-carts"]))
    samples = _samples(generate_latest(registry).decode())

    assert samples["payfleet_fleet_gauges_up"] == 1
    assert samples['payfleet_events{status="received"}'] == 1
    assert samples['payfleet_events{status="failed"}'] == 1
    assert samples['payfleet_events{status="unmatched"}'] == 0
    assert 89 <= samples["payfleet_oldest_unapplied_event_age_seconds"] < 200
    assert samples["payfleet_orders_needing_attention"] == 1
    assert samples['payfleet_job_runs_total{job="expire-stale-orders",state="failed"}'] == 1
    assert samples['payfleet_job_runs_total{job="request-reviews",state="skipped"}'] == 1
    # A job that never failed has its series at 0, so its first failure is an increase.
    assert samples['payfleet_job_runs_total{job="clean-expired-carts",state="failed"}'] == 0


def test_fleet_gauges_say_when_postgresql_cannot_be_read():
    # Nothing listens on this port: the connection is refused at once.
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere")
    registry = CollectorRegistry()
    registry.register(FleetGauges(sessionmaker(engine), ["expire-stale-orders"]))
    samples = _samples(generate_latest(registry).decode())
    assert samples == {"payfleet_fleet_gauges_up": 0}


def test_the_scheduler_exports_the_fleet_gauges(env, client, sessions):
    put_product(client, "MUG", on_hand=3)
    _seed(client, sessions)
    port = free_port()
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "payfleet.cli", "scheduler"],
        env={**os.environ, **env, "SCHEDULER_METRICS_PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def scraped() -> dict[str, float] | None:
            try:
                samples = _samples(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
            except requests.ConnectionError:
                return None
            # The endpoint starts a moment before the gauges are registered.
            return samples if "payfleet_fleet_gauges_up" in samples else None

        samples = eventually(scraped, timeout=30, interval=0.2)
        assert samples["payfleet_fleet_gauges_up"] == 1
        assert samples["payfleet_orders_needing_attention"] == 1
        assert samples['payfleet_job_runs_total{job="expire-stale-orders",state="failed"}'] == 1
    finally:
        stop_group(scheduler, 20)
