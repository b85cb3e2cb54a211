"""One trace id from webhook to provider call (issue 10, item 3): every
stored event gets one at ingest (Stripe's request id where the event has
one, else a fresh one); it travels in the Dramatiq message options to every
attempt, whoever published the message (the ingress, the relay, a replay);
job runs get their own, which their review sends and provider calls carry;
the admin views show it; the log lines of the ingress and the worker that
handle the event carry it, and the provider sees it as X-Payfleet-Trace-Id."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pika
import pytest
import requests
from dramatiq import Middleware
from dramatiq.broker import Broker, MessageProxy
from sqlalchemy import text

from domain.events import EventFacts, record_event
from domain.gateways import TRACE_HEADER, StripeApiGateway, trace_calls, untrace_calls
from payfleet.platform.broker import build_broker
from payfleet.platform.publishing import Publisher
from schedules.relay import OutboxRelay
from tests.conftest import ADMIN_TOKEN, eventually, free_port, scalar
from tests.support.jobs import completed_order, job_runner, make_stale, run_job, stripe_order
from tests.support.processes import payfleet_processes
from tests.support.shop import ADMIN, deliver, intent_event, order, put_product, settle
from tests.support.stripe_signing import stripe_event
from tests.support.traces import FRESH_TRACE
from workers.apply_events import declare_event_actors


def with_request(body: bytes, request: Any) -> bytes:
    """A Stripe event body whose `request` is `request` (Stripe's helper sends none)."""
    event = json.loads(body)
    event["request"] = request
    return json.dumps(event).encode()


def take_messages(broker_url: str, queue: str) -> list[dict[str, Any]]:
    """The Dramatiq messages waiting in `queue` of the test vhost, taken off it."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        taken: list[dict[str, Any]] = []
        while True:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append(json.loads(body))
    finally:
        connection.close()


def wait_for_messages(broker_url: str, queue: str, count: int = 1) -> list[dict[str, Any]]:
    taken: list[dict[str, Any]] = []

    def enough() -> bool:
        taken.extend(take_messages(broker_url, queue))
        return len(taken) >= count

    eventually(enough)
    return taken


def stored_trace(sessions: Any, event_key: str) -> str:
    return str(scalar(sessions, "SELECT trace_id FROM provider_events WHERE event_key = :k", k=event_key))


# --- at ingest ------------------------------------------------------------------


def test_a_stripe_request_id_is_the_trace_id_of_the_event_its_message_and_its_view(
    client, sessions, broker_url
):
    body = with_request(
        stripe_event("customer.created", {"id": "cus_1", "object": "customer"}),
        {"id": "req_T1aB2cD3eF4g", "idempotency_key": "idem-1"},
    )
    assert deliver(client, body).status_code == 200

    [message] = wait_for_messages(broker_url, "payments")
    assert message["actor_name"] == "apply_event"
    assert message["options"]["trace_id"] == "req_T1aB2cD3eF4g"
    event_id = message["args"][0]
    assert stored_trace(sessions, json.loads(body)["id"]) == "req_T1aB2cD3eF4g"

    shown = client.simulate_get(f"/admin/events/{event_id}", headers=ADMIN)
    assert shown.status_code == 200, shown.text
    assert (shown.json["id"], shown.json["trace_id"]) == (event_id, "req_T1aB2cD3eF4g")
    listed = client.simulate_get("/admin/events", headers=ADMIN).json["events"]
    assert [e["trace_id"] for e in listed] == ["req_T1aB2cD3eF4g"]


def test_an_event_no_request_caused_gets_a_fresh_trace_id_kept_by_its_duplicates(
    client, sessions, broker_url
):
    def customer(event_type: str, request: Any) -> bytes:
        return with_request(stripe_event(event_type, {"id": "cus_2", "object": "customer"}), request)

    automatic = customer("customer.updated", {"id": None, "idempotency_key": None})
    no_request = customer("customer.created", None)
    too_long = customer("customer.deleted", {"id": "req_" + "x" * 80})
    # Before API version 2017-05-25, `request` was the request id itself.
    legacy = customer("customer.source.created", "req_legacy1")
    bodies = (automatic, no_request, too_long, legacy)
    for body in bodies:
        assert deliver(client, body).json == {"received": True, "duplicate": False}
    messages = wait_for_messages(broker_url, "payments", len(bodies))

    automatic_key = json.loads(automatic)["id"]
    traces = [stored_trace(sessions, json.loads(body)["id"]) for body in bodies]
    assert traces[3] == "req_legacy1"
    assert all(FRESH_TRACE.match(trace) for trace in traces[:3]), traces
    assert len(set(traces)) == len(bodies)
    assert sorted(m["options"]["trace_id"] for m in messages) == sorted(traces)

    # A redelivery is a duplicate: the stored trace stays, nothing is published.
    assert deliver(client, automatic).json == {"received": True, "duplicate": True}
    assert stored_trace(sessions, automatic_key) == traces[0]
    time.sleep(0.3)  # what the inbox would publish is out well before this
    assert take_messages(broker_url, "payments") == []


def test_an_unknown_event_is_404_and_a_huge_id_is_no_server_error(client):
    assert client.simulate_get("/admin/events/424242", headers=ADMIN).status_code == 404
    assert client.simulate_get("/admin/events/1").status_code == 401
    assert client.simulate_get(f"/admin/events/{10**30}", headers=ADMIN).status_code < 500


# --- every publisher, every attempt -----------------------------------------------


def test_the_relay_and_a_replay_publish_the_stored_trace_id(client, settings, sessions, broker_url):
    # Stored as the ingress stores it, but its publish never happened
    # (RabbitMQ was away): the relay publishes it later.
    facts = EventFacts("stripe", "evt_relayed", "customer.created", None, {"id": "evt_relayed"}, "req_relay1")
    with sessions.begin() as session:
        event_id, _ = record_event(session, facts)
    broker = build_broker(settings)
    try:
        relay = OutboxRelay(sessions, Publisher(broker), grace=0, stuck_after=3600)
        assert relay.run_once() == 1
    finally:
        broker.close()
    [relayed] = wait_for_messages(broker_url, "payments")
    assert (relayed["args"], relayed["options"]["trace_id"]) == ([event_id], "req_relay1")

    # Settled unmatched, then replayed by the operator: the same trace again.
    with sessions.begin() as session:
        session.execute(
            text("UPDATE provider_events SET status = 'unmatched', processed_at = now() WHERE id = :id"),
            {"id": event_id},
        )
    assert client.simulate_post(f"/admin/events/{event_id}/replay", headers=ADMIN).status_code == 202
    [replayed] = wait_for_messages(broker_url, "payments")
    assert (replayed["args"], replayed["options"]["trace_id"]) == ([event_id], "req_relay1")


class Attempts(Middleware):
    """Records what each message handled by the worker carried: (actor,
    retries so far, trace id) per attempt."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str | None]] = []

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        options = message.options
        if message.actor_name.startswith("give_up_"):
            options = message.args[0].get("options", {})
        self.seen.append((message.actor_name, message.options.get("retries", 0), options.get("trace_id")))


@pytest.fixture
def watched_worker(settings: Any, sessions: Any) -> Iterator[Attempts]:
    broker = build_broker(settings)
    attempts = Attempts()
    broker.add_middleware(attempts)
    declare_event_actors(broker, sessions, settings)
    running = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    running.start()
    yield attempts
    running.stop()
    broker.close()


def test_every_attempt_and_the_give_up_carry_the_trace_id(client, sessions, settings, watched_worker):
    # No payment has this PaymentIntent: each attempt fails, is retried,
    # and the event is finally settled unmatched.
    body = with_request(intent_event("payment_intent.succeeded", "pi_nobody"), {"id": "req_retried1"})
    assert deliver(client, body).status_code == 200
    key = json.loads(body)["id"]
    eventually(
        lambda: (
            scalar(sessions, "SELECT status FROM provider_events WHERE event_key = :k", k=key) == "unmatched"
        )
    )
    eventually(lambda: any(actor == "give_up_event" for actor, *_ in watched_worker.seen))
    attempts = settings.event_max_attempts
    assert watched_worker.seen == [
        *[("apply_event", retries, "req_retried1") for retries in range(attempts)],
        ("give_up_event", 0, "req_retried1"),
    ]


# --- the admin views ------------------------------------------------------------------


def test_the_order_view_shows_the_trace_ids_of_the_events_that_changed_it(client, sessions, worker):
    put_product(client, "TEE-T", 3)
    order_id, intent = stripe_order(client, "TEE-T")
    paid = with_request(intent_event("payment_intent.succeeded", intent), {"id": "req_paid1"})
    settle(client, sessions, paid)

    shown = order(client, order_id)
    assert shown["status"] == "paid"
    [event] = [entry for entry in shown["timeline"] if entry["kind"] == "event"]
    assert event["trace_id"] == "req_paid1"
    by_event = [entry for entry in shown["timeline"] if entry["kind"] == "transition" and entry["event_id"]]
    assert by_event and all(entry["trace_id"] == "req_paid1" for entry in by_event)
    assert shown["trace_ids"] == ["req_paid1"]


# --- job runs -----------------------------------------------------------------------------


def test_a_jobs_stripe_calls_carry_its_runs_trace_id(client, sessions, settings, fake_stripe):
    put_product(client, "TEE-J", 5)
    stale = [stripe_order(client, "TEE-J") for _ in range(2)]
    make_stale(sessions, *(order_id for order_id, _ in stale))
    fake_stripe.clear_requests()
    with job_runner(sessions, settings) as runner:
        run = run_job(runner, sessions, "expire-stale-orders")
    assert run["state"] == "succeeded" and run["counts"]["expired"] == 2, run
    assert FRESH_TRACE.match(run["trace_id"])

    calls = fake_stripe.requests
    # One list of the batch's intents, then a cancel per order (made on the
    # provider-call threads): every one names the run.
    assert {(r.method, r.path.count("/cancel")) for r in calls} >= {("GET", 0), ("POST", 1)}
    assert [r.header(TRACE_HEADER) for r in calls] == [run["trace_id"]] * len(calls)


def test_every_page_of_a_stripe_listing_carries_the_trace_id(fake_stripe):
    """A listing longer than a page (100) is fetched page by page, onward or
    backwards from an intent; each page's request names the trace, not only
    the first, and the intents come in the order the docstrings promise."""
    ids = [fake_stripe.add_payment_intent(created=1_700_000_000 + i)["id"] for i in range(230)]
    gateway = StripeApiGateway("sk_test_trace", str(fake_stripe.base_url))
    fake_stripe.clear_requests()
    token = trace_calls("req_listing")
    try:
        newest_first = [intent.id for intent in gateway.list_payment_intents(created_gte=0)]
        oldest_first = [intent.id for intent in gateway.list_payment_intents_after(ids[9])]
    finally:
        untrace_calls(token)

    assert newest_first == ids[::-1]
    assert oldest_first == ids[10:]
    pages = fake_stripe.requests
    assert len(pages) == 3 + 3
    assert [page.header(TRACE_HEADER) for page in pages] == ["req_listing"] * len(pages)


def test_a_manual_run_has_its_own_trace_id_in_its_message(client, broker_url):
    answer = client.simulate_post("/admin/jobs/clean-expired-carts/run", headers=ADMIN)
    assert answer.status_code == 202
    [message] = wait_for_messages(broker_url, "jobs")
    runs = client.simulate_get("/admin/jobs/runs", headers=ADMIN).json["runs"]
    [run] = [r for r in runs if r["id"] == answer.json["run_id"]]
    assert FRESH_TRACE.match(run["trace_id"])
    assert (message["args"], message["options"]["trace_id"]) == ([run["id"]], run["trace_id"])


def test_a_review_send_carries_its_runs_trace_id(client, sessions, settings, broker_url):
    asked = completed_order(sessions, 7.5)
    with job_runner(sessions, settings) as runner:
        run = run_job(runner, sessions, "request-reviews")
    assert run["state"] == "succeeded" and run["counts"]["published"] == 1, run

    [send] = wait_for_messages(broker_url, "notifications")
    with sessions() as session:
        request_id, trace = session.execute(
            text("SELECT id, trace_id FROM review_requests WHERE order_id = :o"), {"o": asked}
        ).one()
    assert trace == run["trace_id"]
    assert (send["actor_name"], send["args"], send["options"]["trace_id"]) == (
        "send_review_request",
        [request_id],
        run["trace_id"],
    )
    assert order(client, str(asked))["trace_ids"] == [run["trace_id"]]


# --- the processes' JSON logs and the provider's view ------------------------------


@pytest.fixture
def fleet(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """`payfleet <args>` as real process groups with LOG_FORMAT=json; each
    returns the file its output goes to."""
    with payfleet_processes(env, tmp_path, LOG_FORMAT="json", WEB_CONCURRENCY="1") as run:
        yield lambda *args: run(*args)[1]


def json_lines(log: Path, trace_id: str) -> list[dict[str, Any]]:
    """The JSON lines of a process's output that carry `trace_id` (Dramatiq's
    own supervisor lines are plain text and skipped)."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict) and parsed.get("trace_id") == trace_id:
            found.append(parsed)
    return found


def test_one_monetbil_payment_is_followed_by_its_trace_id_through_logs_and_provider(
    fleet, fake_monetbil, sessions
):
    port = free_port()
    ingress_log = fleet("ingress", "--bind", f"127.0.0.1:{port}")
    worker_log = fleet("worker", "--processes", "1", "--threads", "2")
    base, admin = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def up() -> bool:
        try:
            return requests.get(f"{base}/readyz", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    eventually(up, timeout=30, interval=0.2)
    product = {"name": "Pagne", "price": 5000, "currency": "XAF", "on_hand": 2}
    assert requests.put(f"{base}/admin/products/PAGNE", json=product, headers=admin, timeout=10).ok
    placed = requests.post(
        f"{base}/checkout",
        json={
            "items": [{"sku": "PAGNE", "quantity": 1}],
            "provider": "monetbil",
            "currency": "XAF",
            "customer": {"email": "ama@example.cm", "phone": "+237670000000"},
        },
        timeout=10,
    ).json()
    callback = fake_monetbil.pay(placed["order_id"], status="success")
    assert requests.post(f"{base}/webhooks/monetbil", data=callback, timeout=10).text == "received"

    def paid() -> Any:
        shown = requests.get(f"{base}/admin/orders/{placed['order_id']}", headers=admin, timeout=10).json()
        return shown if shown["status"] == "paid" else None

    shown = eventually(paid, timeout=30)
    [trace] = shown["trace_ids"]
    assert FRESH_TRACE.match(trace)

    # The ingress's access line for the stored callback, the worker's for applying it.
    stored = eventually(
        lambda: [line for line in json_lines(ingress_log, trace) if line["logger"] == "gunicorn.access"]
    )
    assert stored[0]["process"] == "ingress" and stored[0]["path"] == "/webhooks/monetbil"
    assert (stored[0]["provider"], stored[0]["duplicate"]) == ("monetbil", False)
    applied = eventually(lambda: json_lines(worker_log, trace), timeout=30)
    assert {line["process"] for line in applied} == {"worker"}
    assert all(line["event_id"] == stored[0]["event_id"] for line in applied)
    # Monetbil's check-payment, made while applying the success, names it too.
    checks = [r for r in fake_monetbil.requests if "checkPayment" in r.path]
    assert [r.header(TRACE_HEADER) for r in checks] == [trace]
