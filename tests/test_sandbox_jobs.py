"""Jobs that need a provider, on a fleet that has none configured: recorded
as skipped with the reason, never a failure with a traceback."""

from __future__ import annotations

import logging
from dataclasses import replace

from tests.support.jobs import job_runner, run_job


def test_the_weekly_sweep_without_stripe_is_recorded_skipped(sessions, settings, caplog):
    no_stripe = replace(settings, stripe_api_key="")
    with caplog.at_level(logging.INFO), job_runner(sessions, no_stripe) as runner:
        run = run_job(runner, sessions, "cleanup-stale-payment-intents")
    assert (run["state"], run["error"]) == ("skipped", "skipped: Stripe not configured")
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]


def test_the_weekly_sweep_with_stripe_still_runs(sessions, settings, fake_stripe):
    with job_runner(sessions, settings) as runner:
        run = run_job(runner, sessions, "cleanup-stale-payment-intents")
    assert run["state"] == "succeeded", run
