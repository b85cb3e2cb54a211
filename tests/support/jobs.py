"""Running maintenance jobs in tests: a JobRunner wired like a worker's, a
manual run executed in the test's own thread, and orders made stale."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from falcon import testing
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from domain import job_runs
from domain.models import Order
from payfleet.platform.broker import build_broker
from payfleet.platform.config import Settings, job_table
from payfleet.platform.publishing import Publisher
from tests.support.shop import checkout
from workers.job_runner import JobContext, JobGateways, JobRunner, job_gateways


@contextmanager
def job_runner(
    sessions: sessionmaker[Session],
    settings: Settings,
    clock: Callable[[], datetime] | None = None,
    *,
    gateways: Callable[[JobGateways], JobGateways] = lambda real: real,
) -> Iterator[JobRunner]:
    """`gateways` may wrap the real providers' gateways (a test's twist on them)."""
    broker = build_broker(settings)
    context = JobContext(
        sessions,
        settings,
        gateways(job_gateways(settings)),
        Publisher(broker),
        clock or (lambda: datetime.now(UTC)),
    )
    try:
        yield JobRunner(context, job_table(settings))
    finally:
        broker.close()


def run_job(runner: JobRunner, sessions: sessionmaker[Session], name: str) -> dict[str, Any]:
    """A manual run of `name`, executed here and now; returns its record."""
    with sessions() as session:
        run_id = job_runs.create_manual(session, name)
        session.commit()
    runner.execute(run_id)
    with sessions() as session:
        run = job_runs.get(session, run_id)
    assert run is not None
    return run


def stripe_order(client: testing.TestClient, sku: str, quantity: int = 1) -> tuple[str, str]:
    """Check out through the API; returns (order id, PaymentIntent id)."""
    answer = checkout(client, (sku, quantity))
    assert answer.status_code == 201, answer.text
    return answer.json["order_id"], answer.json["payment"]["provider_payment_id"]


def make_stale(sessions: sessionmaker[Session], *order_ids: str, age: str = "2 hours") -> None:
    """Orders (and their payments and reservations) placed `age` ago, so their window has passed."""
    with sessions() as session:
        for order_id in order_ids:
            params = {"id": order_id, "age": age}
            session.execute(
                text(
                    "UPDATE orders SET expires_at = now() - CAST(:age AS interval) + interval '30 minutes', "
                    "created_at = now() - CAST(:age AS interval) WHERE id = :id"
                ),
                params,
            )
            session.execute(
                text("UPDATE payments SET created_at = now() - CAST(:age AS interval) WHERE order_id = :id"),
                params,
            )
            session.execute(
                text(
                    "UPDATE stock_reservations SET created_at = now() - CAST(:age AS interval) "
                    "WHERE order_id = :id"
                ),
                params,
            )
        session.commit()


def order_status(sessions: sessionmaker[Session], order_id: str) -> tuple[str, str]:
    with sessions() as session:
        row = session.execute(
            text(
                "SELECT o.status, p.status FROM orders o JOIN payments p ON p.order_id = o.id "
                "WHERE o.id = :id"
            ),
            {"id": order_id},
        ).one()
    return row[0], row[1]


def completed_order(
    sessions: sessionmaker[Session], days_ago: float, phone: str | None = "+33611111111"
) -> uuid.UUID:
    """An order completed `days_ago` days ago, as the review job looks for them."""
    order_id = uuid.uuid4()
    completed = datetime.now(UTC) - timedelta(days=days_ago)
    with sessions.begin() as session:
        session.add(
            Order(
                id=order_id,
                status="completed",
                currency="EUR",
                total_amount=1500,
                customer_phone=phone,
                expires_at=completed,
                completed_at=completed,
            )
        )
    return order_id
