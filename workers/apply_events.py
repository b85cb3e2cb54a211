"""The actors: thin adapters that open a unit of work, call one domain
service and commit. Retry policy is declared here, on the actor."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import dramatiq
from dramatiq import Broker
from dramatiq.middleware import TimeLimitExceeded
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from domain import events
from domain.errors import ConfirmationNeeded
from domain.gateways import MonetbilApiGateway, MonetbilCheck
from payfleet.platform.config import Settings
from payfleet.platform.group_commit import GroupCommit
from payfleet.platform.publishing import APPLY_EVENT, PAYMENTS_QUEUE
from workers import metrics

log = logging.getLogger(__name__)

# More would only lengthen the transaction: a process's batch is at most the
# messages its threads hold at once.
APPLY_BATCH_MAX = 64
# How long a batch may wait for the process's other threads (see GroupCommit).
APPLY_BATCH_LINGER = 0.005

# The share of the actor's time limit an attempt's statements may use; the
# rest is left to record the attempt before Dramatiq's TimeLimit interrupts.
STATEMENTS_SHARE = 0.9
# SQLSTATE of a statement PostgreSQL cancelled (its statement timeout).
QUERY_CANCELED = "57014"
# One transaction's statement timeout (local to it).
_STATEMENT_TIMEOUT = text("SELECT set_config('statement_timeout', :ms, true)")


class AttemptTimedOut(Exception):
    """The attempt used up its time limit before it could start another step."""


class Deadlines:
    """An attempt's time limit, told to PostgreSQL. Dramatiq's TimeLimit
    raises in the worker thread, which only sees it once it runs Python
    again: never while it waits inside a statement for a row lock, nor while
    it waits for its batch. So each transaction of an attempt gets a
    statement timeout ending before the limit whenever the session's own
    timeout would end later."""

    def __init__(self, settings: Settings) -> None:
        self.time_limit = settings.event_time_limit_seconds
        self._statements_for = self.time_limit * STATEMENTS_SHARE
        self._session_timeout = settings.db_statement_timeout_seconds

    def start(self) -> float:
        return time.monotonic() + self._statements_for

    def bound(self, session: Session, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AttemptTimedOut(f"no time left of the attempt's {self.time_limit:g} s limit")
        if 0 < self._session_timeout <= remaining:
            return  # the session's timeout comes first: no extra statement on the usual path
        session.execute(_STATEMENT_TIMEOUT, {"ms": str(max(1, int(remaining * 1000)))})

    def reason(self, error: BaseException, deadline: float) -> str:
        """Why the attempt failed, as the event keeps it: a statement the
        deadline cancelled is the time limit too."""
        limited = f"TimeLimitExceeded: the attempt ran past its {self.time_limit:g} s time limit"
        if isinstance(error, TimeLimitExceeded):
            return limited
        described = events.describe_failure(error)
        return f"{limited} ({described})" if self._cut_short(error, deadline) else described

    @staticmethod
    def _cut_short(error: BaseException, deadline: float) -> bool:
        if isinstance(error, AttemptTimedOut):
            return True
        cancelled = getattr(getattr(error, "orig", None), "sqlstate", None) == QUERY_CANCELED
        return cancelled and time.monotonic() >= deadline


def declare_event_actors(broker: Broker, sessions: sessionmaker[Session], settings: Settings) -> None:
    monetbil = MonetbilApiGateway(
        settings.monetbil_service_key, settings.monetbil_api_base, timeout=settings.monetbil_timeout_seconds
    )
    deadlines = Deadlines(settings)

    def apply_batch(event_ids: Sequence[int]) -> list[str | None]:
        with sessions.begin() as session:
            deadlines.bound(session, deadlines.start())
            settled = events.apply_events(session, event_ids)
        return [settled.get(event_id) for event_id in event_ids]

    def applied(event_id: int, status: str | None) -> None:
        # Run by the batch's thread in the event's actor context (its
        # event_id and trace_id), once the actor has its answer. The eight
        # actor threads a commit wakes no longer queue on the log handler's
        # lock all at once (each holder gives up the GIL in its write and
        # must win it back while the others wait): one thread writes the
        # batch's lines while the actors ack and fetch their next messages.
        if status is not None:
            log.info("event %s: %s", event_id, status)

    # The events this process's actor threads are given at about the same
    # time are applied in one transaction: a handful of statements and one
    # commit for all of them instead of a dozen and one each.
    batches = GroupCommit(
        apply_batch, max_size=APPLY_BATCH_MAX, linger=APPLY_BATCH_LINGER, name="apply-events", after=applied
    )

    def apply_grouped(event_id: int) -> str | None:
        """The event's status once its batch committed (its line is then
        written by `applied`); None when it is to be applied alone."""
        try:
            return batches.call(event_id)
        except Exception:
            # Any error (a deadlock, a lost connection, a bad event): each
            # event of the batch is tried alone, so an error lands on the
            # event that has it, with its own retries.
            log.info("event %s: its batch failed; applying it alone", event_id, exc_info=True)
            return None

    def apply(event_id: int, deadline: float) -> tuple[str, MonetbilCheck | None]:
        """One transaction for most events. A claimed Monetbil success first
        rolls back, asks check-payment outside any transaction (no row lock
        waits on the network; an outage raises and is retried), then applies
        with the answer."""
        try:
            with sessions.begin() as session:
                deadlines.bound(session, deadline)
                return events.apply_event(session, event_id), None
        except ConfirmationNeeded as needed:
            confirmed = monetbil.check_transaction(needed.transaction_id)
        with sessions.begin() as session:
            deadlines.bound(session, deadline)
            return events.apply_event(session, event_id, confirmed), confirmed

    @dramatiq.actor(
        broker=broker,
        actor_name=APPLY_EVENT,
        queue_name=PAYMENTS_QUEUE,
        max_retries=settings.event_max_attempts - 1,
        retry_delays=tuple(int(delay * 1000) for delay in settings.event_retry_delays_seconds),
        time_limit=int(settings.event_time_limit_seconds * 1000),
        # Failed at once, without retries (the event settled failed with why).
        throws=events.UNCURABLE,
        on_retry_exhausted="give_up_event",
    )
    def apply_event(event_id: int) -> None:
        deadline = deadlines.start()
        try:
            if apply_grouped(event_id) is not None:
                return  # applied in its batch, whose thread writes its line (`applied`)
            status, confirmed = apply(event_id, deadline)
            # Counted once the verdict is committed, not once per attempt.
            if confirmed is not None and (confirmed.status != "succeeded" or status == "failed"):
                log.warning(
                    "Monetbil event %s: callback said success, check-payment says %s", event_id, confirmed
                )
                metrics.monetbil_disagreements().inc()
        except BaseException as error:
            # Kept on the event row (its own transaction, the first rolled
            # back) so the operator sees why it is waiting; then retried, or
            # settled failed now when waiting cannot help. BaseException:
            # an attempt Dramatiq's TimeLimitExceeded ends is an attempt too.
            reason = deadlines.reason(error, deadline)
            final = isinstance(error, events.UNCURABLE)
            with sessions.begin() as session:
                events.record_failed_attempt(session, event_id, reason, final=final)
            raise
        log.info("event %s: %s", event_id, status)

    @dramatiq.actor(broker=broker, actor_name="give_up_event", queue_name=PAYMENTS_QUEUE, max_retries=5)
    def give_up_event(message: dict[str, Any], retry_info: dict[str, Any]) -> None:
        event_id = int(message["args"][0])
        with sessions.begin() as session:
            status = events.give_up(session, event_id)
        log.warning("event %s gave up after %s retries: %s", event_id, retry_info.get("retries"), status)
