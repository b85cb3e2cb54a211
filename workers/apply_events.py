"""The actors: thin adapters that open a unit of work, call one domain
service and commit. Retry policy is declared here, on the actor."""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq import Broker
from sqlalchemy.orm import Session, sessionmaker

from domain import events
from domain.errors import ConfirmationNeeded
from domain.gateways import MonetbilApiGateway, MonetbilCheck
from payfleet.platform.config import Settings
from payfleet.platform.publishing import APPLY_EVENT, PAYMENTS_QUEUE
from workers import metrics

log = logging.getLogger(__name__)


def declare_event_actors(broker: Broker, sessions: sessionmaker[Session], settings: Settings) -> None:
    monetbil = MonetbilApiGateway(
        settings.monetbil_service_key, settings.monetbil_api_base, timeout=settings.monetbil_timeout_seconds
    )

    def apply(event_id: int) -> tuple[str, MonetbilCheck | None]:
        """One transaction for most events. A claimed Monetbil success first
        rolls back, asks check-payment outside any transaction (no row lock
        waits on the network; an outage raises and is retried), then applies
        with the answer."""
        try:
            with sessions.begin() as session:
                return events.apply_event(session, event_id), None
        except ConfirmationNeeded as needed:
            confirmed = monetbil.check_transaction(needed.transaction_id)
        with sessions.begin() as session:
            return events.apply_event(session, event_id, confirmed), confirmed

    @dramatiq.actor(
        broker=broker,
        actor_name=APPLY_EVENT,
        queue_name=PAYMENTS_QUEUE,
        max_retries=settings.event_max_attempts - 1,
        retry_delays=tuple(int(delay * 1000) for delay in settings.event_retry_delays_seconds),
        time_limit=int(settings.event_time_limit_seconds * 1000),
        on_retry_exhausted="give_up_event",
    )
    def apply_event(event_id: int) -> None:
        try:
            status, confirmed = apply(event_id)
            # Counted once the verdict is committed, not once per attempt.
            if confirmed is not None and (confirmed.status != "succeeded" or status == "failed"):
                log.warning(
                    "Monetbil event %s: callback said success, check-payment says %s", event_id, confirmed
                )
                metrics.monetbil_disagreements().inc()
        except Exception as error:
            # Kept on the event row (its own transaction, the first rolled
            # back) so the operator sees why it is waiting; then retried.
            with sessions.begin() as session:
                events.record_failed_attempt(session, event_id, error)
            raise
        log.info("event %s: %s", event_id, status)

    @dramatiq.actor(broker=broker, actor_name="give_up_event", queue_name=PAYMENTS_QUEUE, max_retries=5)
    def give_up_event(message: dict[str, Any], retry_info: dict[str, Any]) -> None:
        event_id = int(message["args"][0])
        with sessions.begin() as session:
            status = events.give_up(session, event_id)
        log.warning("event %s gave up after %s retries: %s", event_id, retry_info.get("retries"), status)
