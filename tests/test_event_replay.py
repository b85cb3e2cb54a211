"""Replays: settled events reopened and applied again, one by id or many by
filter (status, provider, type, received since/until), from the command line
and the admin API; a dry run lists exactly the ids a replay takes and
changes nothing; a bad filter is refused with a clear error."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from payfleet.cli.main import main
from tests.conftest import eventually, scalar
from tests.support.shop import (
    ADMIN,
    checkout,
    deliver,
    intent_event,
    monetbil_checkout,
    order,
    post_callback,
    put_product,
)


@pytest.fixture
def payfleet(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    """`payfleet ARGS…` as the operator runs it: (exit code, stdout, stderr)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit:
            code = int(exit.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def settled_status(sessions: Any, event_id: int) -> str | None:
    status = scalar(sessions, "SELECT status FROM provider_events WHERE id = :id", id=event_id)
    return None if status == "received" else str(status)


def stripe_event(client: Any, sessions: Any, event_type: str, intent: str) -> int:
    assert deliver(client, intent_event(event_type, intent)).status_code == 200
    return int(
        scalar(
            sessions,
            "SELECT id FROM provider_events WHERE provider_payment_id = :pi AND event_type = :t",
            pi=intent,
            t=event_type,
        )
    )


def failed_monetbil_event(client: Any, sessions: Any, fake_monetbil: Any) -> int:
    """Monetbil confirms a success of another amount than the order's: failed."""
    put_product(client, "PAGNE", on_hand=5, currency="XAF", price=5000)
    answer = monetbil_checkout(client, ("PAGNE", 1))
    assert answer.status_code == 201, answer.text
    form = fake_monetbil.pay(answer.json["order_id"], status="success", amount="100")
    assert post_callback(client, form).text == "received"
    return int(scalar(sessions, "SELECT id FROM provider_events WHERE provider = 'monetbil'"))


@pytest.fixture
def stored(client, sessions, worker, fake_monetbil) -> dict[str, Any]:
    """Events as the worker settled them: two unmatched Stripe events (one
    received two days ago), an ignored one, a failed Monetbil one and a
    processed one."""
    put_product(client, "SCARF", on_hand=5)
    placed = checkout(client, ("SCARF", 1)).json
    made = {
        "old_succeeded": stripe_event(client, sessions, "payment_intent.succeeded", "pi_gone"),
        "processing": stripe_event(client, sessions, "payment_intent.processing", "pi_other"),
        "ignored": stripe_event(client, sessions, "payment_intent.created", "pi_new"),
        "failed": failed_monetbil_event(client, sessions, fake_monetbil),
        "processed": stripe_event(
            client, sessions, "payment_intent.processing", placed["payment"]["provider_payment_id"]
        ),
    }
    expected = {
        "old_succeeded": "unmatched",
        "processing": "unmatched",
        "ignored": "ignored",
        "failed": "failed",
        "processed": "processed",
    }
    eventually(
        lambda: {name: settled_status(sessions, i) for name, i in made.items()} == expected, timeout=20
    )
    with sessions.begin() as session:
        session.execute(
            text("UPDATE provider_events SET received_at = now() - interval '2 days' WHERE id = :id"),
            {"id": made["old_succeeded"]},
        )
    return {**made, "order": placed["order_id"]}


def snapshot(sessions: Any) -> list[tuple[Any, ...]]:
    with sessions() as session:
        rows = session.execute(
            text("SELECT id, status, attempts, processed_at, published_at FROM provider_events ORDER BY id")
        )
        return [tuple(row) for row in rows]


YESTERDAY = (datetime.now(UTC) - timedelta(days=1)).isoformat()

# (filter, the events it takes)
FILTERS: list[tuple[dict[str, str], list[str]]] = [
    ({"status": "unmatched"}, ["old_succeeded", "processing"]),
    ({"status": "unmatched", "provider": "stripe"}, ["old_succeeded", "processing"]),
    ({"status": "unmatched", "provider": "monetbil"}, []),
    ({"status": "unmatched", "type": "payment_intent.processing"}, ["processing"]),
    ({"status": "unmatched", "since": YESTERDAY}, ["processing"]),
    ({"status": "unmatched", "until": YESTERDAY}, ["old_succeeded"]),
    ({"status": "failed"}, ["failed"]),
    ({"status": "failed", "provider": "monetbil"}, ["failed"]),
    ({"status": "ignored"}, ["ignored"]),
]


def test_a_dry_run_lists_exactly_the_ids_each_filter_takes_and_changes_nothing(
    stored, client, sessions, payfleet
):
    before = snapshot(sessions)
    for chosen, names in FILTERS:
        ids = [stored[name] for name in names]
        answer = client.simulate_post("/admin/events/replay", json={**chosen, "dry_run": True}, headers=ADMIN)
        assert answer.status_code == 200, answer.text
        assert answer.json == {"count": len(ids), "ids": ids, "dry_run": True}, chosen
        options = [part for name, value in chosen.items() for part in (f"--{name}", value)]
        code, out, err = payfleet("events", "replay", *options, "--dry-run")
        assert code == 0, err
        assert [
            int(line.split()[-1]) for line in out.splitlines() if line.startswith("would replay event")
        ] == ids
        assert f"would replay {len(ids)} event(s)" in out
    assert snapshot(sessions) == before


def test_a_replay_by_filter_replays_exactly_the_matching_events(stored, client, sessions, payfleet):
    # The missing payment turns up: the old event's PaymentIntent is the order's.
    with sessions.begin() as session:
        session.execute(
            text("UPDATE payments SET provider_payment_id = 'pi_gone' WHERE order_id = :o"),
            {"o": stored["order"]},
        )
    before = {row[0]: row for row in snapshot(sessions)}
    code, out, err = payfleet(
        "events",
        "replay",
        "--status",
        "unmatched",
        "--type",
        "payment_intent.succeeded",
        "--until",
        YESTERDAY,
    )
    assert code == 0, err
    assert "replayed 1 event(s): 1 published" in out
    eventually(lambda: order(client, stored["order"])["status"] == "paid")
    assert settled_status(sessions, stored["old_succeeded"]) == "processed"
    after = {row[0]: row for row in snapshot(sessions)}
    assert {i for i in after if after[i] != before[i]} == {stored["old_succeeded"]}


def test_the_admin_api_replays_by_filter_with_202_and_the_count(stored, client, sessions):
    attempts = scalar(sessions, "SELECT attempts FROM provider_events WHERE id = :id", id=stored["ignored"])
    answer = client.simulate_post(
        "/admin/events/replay", json={"status": "ignored", "provider": "stripe"}, headers=ADMIN
    )
    assert answer.status_code == 202, answer.text
    assert answer.json == {"count": 1, "published": 1}
    # Applied again by the worker: still nothing to do, so ignored again, one attempt more.
    eventually(
        lambda: (
            scalar(sessions, "SELECT attempts FROM provider_events WHERE id = :id", id=stored["ignored"])
            == attempts + 1
        )
    )
    assert settled_status(sessions, stored["ignored"]) == "ignored"
    assert settled_status(sessions, stored["processing"]) == "unmatched"
    assert client.simulate_post("/admin/events/replay", json={"status": "ignored"}).status_code == 401


BAD_BODIES = [
    ({}, "status must be one of"),
    ({"status": "processed"}, "status must be one of"),
    ({"status": "failed", "provider": "paypal"}, "provider must be one of"),
    ({"status": "failed", "since": "yesterday"}, "since must be an ISO 8601 time"),
    ({"status": "failed", "since": "2026-11-30T10:00:00Z", "until": "2026-11-30T09:00:00Z"}, "before until"),
    ({"status": "failed", "statuses": "unmatched"}, "unknown field(s) statuses"),
    ({"status": 5}, "'status' must be a str"),
    ({"status": "failed", "dry_run": "yes"}, "'dry_run' must be a bool"),
]


def test_bad_filters_are_refused_clearly_and_change_nothing(stored, client, sessions, payfleet):
    before = snapshot(sessions)
    for body, detail in BAD_BODIES:
        answer = client.simulate_post("/admin/events/replay", json=body, headers=ADMIN)
        assert answer.status_code == 400, (body, answer.text)
        assert detail in answer.json["detail"], (body, answer.json)
    assert client.simulate_post("/admin/events/replay", body="[1]", headers=ADMIN).status_code == 400
    for args, detail in [
        (("--status", "processed"), "status must be one of"),
        (("--provider", "stripe"), "status must be one of"),
        (("--status", "failed", "--since", "soon"), "since must be an ISO 8601 time"),
        ((str(stored["failed"]), "--status", "failed"), "not both"),
        ((), "name event ids"),
        (("--status", "failed", "--rate", "fast"), "not a rate"),
    ]:
        code, _, err = payfleet("events", "replay", *args)
        assert code == 2 and detail in err, (args, err)
    assert snapshot(sessions) == before


def test_replay_by_ids_and_its_dry_run(stored, sessions, payfleet):
    code, out, _ = payfleet("events", "replay", str(stored["ignored"]), str(stored["processed"]), "--dry-run")
    assert code == 0
    assert f"would replay event {stored['ignored']} (ignored)" in out
    assert f"would leave event {stored['processed']} (processed)" in out
    code, out, _ = payfleet("events", "replay", str(stored["ignored"]), str(stored["processed"]))
    assert code == 1  # one of them refused, and said so
    assert f"event {stored['ignored']} reopened; published" in out
    assert f"event {stored['processed']} is processed" in out
    eventually(lambda: settled_status(sessions, stored["ignored"]) == "ignored")


def test_a_replay_at_a_rate_is_paced(stored, sessions, payfleet):
    started = time.monotonic()
    code, out, err = payfleet("events", "replay", "--status", "unmatched", "--rate", "1/s")
    assert code == 0, err
    assert "replayed 2 event(s)" in out
    assert time.monotonic() - started >= 0.9  # two events at one a second


def test_admin_replay_of_one_event_reopens_an_unmatched_event_and_refuses_a_processed_one(
    stored, client, sessions
):
    event_id = stored["old_succeeded"]
    with sessions.begin() as session:
        session.execute(
            text("UPDATE payments SET provider_payment_id = 'pi_gone' WHERE order_id = :o"),
            {"o": stored["order"]},
        )
    replayed = client.simulate_post(f"/admin/events/{event_id}/replay", headers=ADMIN)
    assert replayed.status_code == 202, replayed.text
    assert replayed.json == {"id": event_id, "status": "received", "published": True}
    eventually(lambda: order(client, stored["order"])["status"] == "paid")

    again = client.simulate_post(f"/admin/events/{event_id}/replay", headers=ADMIN)
    assert again.status_code == 409
    assert again.json["error"] == "conflict"
    assert client.simulate_post("/admin/events/999999/replay", headers=ADMIN).status_code == 404
    assert client.simulate_post(f"/admin/events/{event_id}/replay").status_code == 401
