"""The review request sender (queue `notifications`): one WhatsApp message
per claimed request, never two. The claim commits before the API call and the
outcome after it, so a crash in between leaves `sending`, which is never sent
again (it is recorded failed, outcome unknown)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
from dramatiq import Broker
from sqlalchemy.orm import Session, sessionmaker

from domain import review_requests
from domain.messaging import MessagingError, WhatsAppGateway
from payfleet.platform.config import Settings
from payfleet.platform.publishing import NOTIFICATIONS_QUEUE, SEND_REVIEW_REQUEST
from workers import metrics

log = logging.getLogger(__name__)


def send_stale_after(settings: Settings) -> timedelta:
    """How old a `sending` claim must be before its sender is taken for
    dead: longer than a send can last (connect and read timeouts)."""
    return timedelta(seconds=2 * settings.whatsapp_timeout_seconds + 30)


def _count_unknown(unknown: bool) -> None:
    if unknown:
        metrics.review_outcomes_unknown().inc()


class PermanentSendFailure(Exception):
    """The messaging API refused for good (a bad number, bad credentials)."""


def declare_review_sender(
    broker: Broker, sessions: sessionmaker[Session], settings: Settings, whatsapp: WhatsAppGateway
) -> None:
    stale_after = send_stale_after(settings)

    def send_review_request(request_id: int) -> None:
        # The claim commits before the API call and the outcome after it: a
        # crash in between leaves `sending`, which is never sent again.
        with sessions.begin() as session:
            claimed = review_requests.claim_review_request(
                session, request_id, datetime.now(UTC), stale_after
            )
        if not isinstance(claimed, review_requests.ReviewSend):
            _count_unknown(claimed == review_requests.OUTCOME_UNKNOWN)
            log.info("review request %s: %s", request_id, claimed)
            return
        try:
            sid = whatsapp.send(to=claimed.phone, body=claimed.body)
        except MessagingError as error:
            with sessions.begin() as session:
                review_requests.record_send_failure(session, request_id, error)
            _count_unknown(error.ambiguous)
            if not error.retryable:
                raise PermanentSendFailure(str(error)) from None
            raise
        with sessions.begin() as session:
            status = review_requests.mark_review_sent(session, request_id, sid)
        log.info("review request %s: %s", request_id, status)

    dramatiq.actor(
        broker=broker,
        actor_name=SEND_REVIEW_REQUEST,
        queue_name=NOTIFICATIONS_QUEUE,
        max_retries=settings.notification_max_attempts - 1,
        retry_delays=tuple(int(delay * 1000) for delay in settings.notification_retry_delays_seconds),
        throws=(PermanentSendFailure,),
        on_retry_exhausted="give_up_review_request",
    )(send_review_request)

    def give_up_review_request(message: dict[str, Any], retry_info: dict[str, Any]) -> None:
        request_id = int(message["args"][0])
        with sessions.begin() as session:
            status = review_requests.give_up_review_request(session, request_id)
        log.warning(
            "review request %s gave up after %s retries: %s", request_id, retry_info.get("retries"), status
        )

    dramatiq.actor(
        broker=broker,
        actor_name="give_up_review_request",
        queue_name=NOTIFICATIONS_QUEUE,
        max_retries=5,
    )(give_up_review_request)
