"""The job actors (queue `jobs`): one per job of the table, each running
its job's batches (the work itself is in the job's domain module).

A job message carries its run id. The actor locks the run's row, takes the
job's lock (a PostgreSQL advisory lock on a connection of its own, released
by PostgreSQL itself if the worker dies), so two runs of one job never
overlap, and moves the run to `running` in that same transaction; then it
does the work in one transaction per batch, and
records the outcome. A message for a finished run does nothing.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property, partial
from typing import Any, TypeVar

import dramatiq
from dramatiq import Broker
from dramatiq.middleware.time_limit import TimeLimitExceeded
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from domain import carts, expire_orders, gateways, job_runs, payment_intent_sweep, review_requests, stock
from domain.errors import ProviderError
from domain.expire_orders import PaymentChecker, StaleOrder, StripeIntents, Verdict
from domain.gateways import MonetbilApiGateway, PaymentIntent, StripeApiGateway
from domain.job_runs import StartedRun
from domain.job_table import JobTable
from domain.messaging import WhatsAppApiGateway, WhatsAppGateway
from domain.throttle import RateLimiter, ThrottledRequestsClient
from payfleet.platform import dead_letter_queues, logs
from payfleet.platform.config import Settings, job_table
from payfleet.platform.publishing import (
    JOBS_QUEUE,
    Publisher,
    review_request_message,
)
from workers.review_sender import declare_review_sender, send_stale_after

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobGateways:
    stripe: StripeIntents
    monetbil: PaymentChecker | None
    whatsapp: WhatsAppGateway


def job_gateways(settings: Settings) -> JobGateways:
    """The providers the jobs talk to. Stripe calls are paced to
    STRIPE_MAX_RPS, and a 429 waits and asks again."""
    throttled = ThrottledRequestsClient(
        RateLimiter(settings.stripe_max_rps),
        timeout=settings.stripe_timeout_seconds,
        base_url=settings.stripe_api_base,
    )
    stripe = StripeApiGateway(
        settings.stripe_api_key,
        settings.stripe_api_base,
        timeout=settings.stripe_timeout_seconds,
        http_client=throttled,
    )
    whatsapp = WhatsAppApiGateway(
        settings.whatsapp_api_base,
        settings.whatsapp_account_sid,
        settings.whatsapp_auth_token,
        settings.whatsapp_from,
        timeout=settings.whatsapp_timeout_seconds,
    )
    monetbil = MonetbilApiGateway(
        settings.monetbil_service_key, settings.monetbil_api_base, timeout=settings.monetbil_timeout_seconds
    )
    return JobGateways(stripe=stripe, monetbil=monetbil, whatsapp=whatsapp)


@dataclass(frozen=True)
class JobContext:
    sessions: sessionmaker[Session]
    settings: Settings
    gateways: JobGateways
    sender: Publisher
    clock: Callable[[], datetime]

    @cached_property
    def provider_calls(self) -> ThreadPoolExecutor:
        """Threads for provider calls a job makes side by side (each paced by
        the gateway's own rate limit)."""
        return ThreadPoolExecutor(self.settings.provider_concurrency, thread_name_prefix="provider-call")

    def beside(self, work: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """`work` on each item on the provider-call threads, each call in a
        copy of the caller's context: its log lines and provider calls carry
        the run's trace id (a pool thread has a context of its own)."""
        context = contextvars.copy_context()
        return self.provider_calls.map(lambda item: context.copy().run(work, item), items)

    def start_beside(self, work: Callable[[T], R], items: Iterable[T]) -> list[Future[R]]:
        """`beside`, returning at once with the calls' futures."""
        context = contextvars.copy_context()
        return [self.provider_calls.submit(context.copy().run, work, item) for item in items]


T = TypeVar("T")
R = TypeVar("R")


Work = Callable[[JobContext, StartedRun, Counter[str]], None]


def _expire_stale_orders(c: JobContext, run: StartedRun, counts: Counter[str]) -> None:
    """A batch is read, then each of its orders is asked about and settled
    by one of the provider-call threads: the provider is asked with no
    transaction open, then the order is settled in a short transaction of
    its own. Settling beside the calls, not one after another in this
    thread, is what keeps the job bound by the provider: a settle is a
    handful of round trips and a commit, as long as a fast provider's
    answer. The next batch is read and listed while the calls of the one
    before are under way, so that no call waits for a list."""
    attention_after = timedelta(seconds=c.settings.pending_attention_after_seconds)
    after: StaleOrder | None = None
    in_flight: list[list[Future[Counter[str]]]] = []
    try:
        while True:
            with c.sessions() as session:
                batch = expire_orders.stale_orders(session, c.clock(), after=after, limit=EXPIRE_BATCH)
            listed = expire_orders.listed_intents(c.gateways.stripe, batch)
            counts["listed"] += len(listed)
            in_flight.append(c.start_beside(partial(_expire_one, c, run.id, attention_after, listed), batch))
            if len(in_flight) > 1:
                _count_results(in_flight.pop(0), counts)
            if len(batch) < EXPIRE_BATCH:
                break
            after = batch[-1]
        while in_flight:
            _count_results(in_flight.pop(0), counts)
    finally:
        for calls in in_flight:  # a failed run leaves no call of its own to start
            for call in calls:
                call.cancel()


def _count_results(calls: list[Future[Counter[str]]], counts: Counter[str]) -> None:
    """Adds the calls' counts, all or (the first error raised) none."""
    counts.update(sum((call.result() for call in calls), Counter()))


def _expire_one(
    c: JobContext,
    run_id: int,
    attention_after: timedelta,
    listed: dict[str, PaymentIntent],
    stale: StaleOrder,
) -> Counter[str]:
    counts = Counter({"examined": 1})
    verdict = _ask_provider(c, run_id, stale, listed.get(stale.provider_payment_id or ""))
    if isinstance(verdict, ProviderError):
        counts["provider_errors"] += 1
        if not stale.overdue(c.clock(), attention_after):
            # Left pending: the next run asks again.
            log.warning("order %s left pending: %s", stale.order_id, verdict.detail)
            return counts
        verdict = Verdict("unanswered", f"the provider keeps failing: {verdict.detail}")
    settle = partial(
        expire_orders.settle, order=stale, verdict=verdict, now=c.clock(), attention_after=attention_after
    )
    _settle(c, counts, settle)
    return counts


EXPIRE_BATCH = 100


def _ask_provider(
    c: JobContext, run_id: int, stale: StaleOrder, listed: PaymentIntent | None
) -> Verdict | ProviderError:
    try:
        return expire_orders.ask_provider(
            c.gateways.stripe, c.gateways.monetbil, stale, run_id, listed=listed
        )
    except ProviderError as error:
        return error


def _cleanup_stale_payment_intents(c: JobContext, run: StartedRun, counts: Counter[str]) -> None:
    """Like expire-stale-orders: each batch is read without locks, Stripe is
    asked side by side with no transaction open, then each payment is locked,
    re-checked and settled in a short transaction of its own."""
    if not c.settings.stripe_api_key:
        raise payment_intent_sweep.NotConfigured("Stripe not configured")
    now = c.clock()
    window = timedelta(seconds=c.settings.order_payment_window_seconds)
    seen: set[str] = set()
    after: uuid.UUID | None = None
    while True:
        with c.sessions() as session:
            batch = payment_intent_sweep.open_stripe_payments(
                session, now, window, after=after, limit=SWEEP_BATCH
            )
        if batch:
            counts["examined"] += len(batch)
        _sweep(c, run.id, now, [(payment, None) for payment in batch], counts)
        seen.update(payment.intent_id for payment in batch if payment.intent_id)
        if len(batch) < SWEEP_BATCH:
            break
        after = batch[-1].payment_id
    # Then what Stripe itself lists for the last 8 days: intents this
    # database lost track of, or whose payment looks settled but is not.
    since = int((now - timedelta(days=8)).timestamp())
    listed = iter(c.gateways.stripe.list_payment_intents(created_gte=since))
    while batch_of := _take(listed, SWEEP_BATCH, skip=seen):
        counts["listed"] += len(batch_of)
        with c.sessions() as session:
            known = payment_intent_sweep.payments_for_intents(session, batch_of)
        if known:
            counts["listed_known"] += len(known)
        orphans = [intent for intent in batch_of if intent.id not in known]
        for found in c.beside(partial(_handle_orphan, c, run.id), orphans):
            counts.update(found)
        _sweep(
            c, run.id, now, [(known[intent.id], intent) for intent in batch_of if intent.id in known], counts
        )


SWEEP_BATCH = 50

SweepItem = tuple[payment_intent_sweep.OpenPayment, PaymentIntent | None]


def _sweep(c: JobContext, run_id: int, now: datetime, items: list[SweepItem], counts: Counter[str]) -> None:
    answers = c.beside(partial(_ask_stripe, c, run_id, now), items)
    for (payment, _), answer in zip(items, answers, strict=True):
        if isinstance(answer, ProviderError):
            log.warning("payment %s not synced: %s", payment.payment_id, answer.detail)
            counts["provider_errors"] += 1
            continue
        _settle(c, counts, partial(payment_intent_sweep.settle, payment=payment, answer=answer, now=now))


def _ask_stripe(
    c: JobContext, run_id: int, now: datetime, item: SweepItem
) -> payment_intent_sweep.StripeAnswer | ProviderError:
    payment, intent = item
    try:
        return payment_intent_sweep.ask_stripe(c.gateways.stripe, payment, now, run_id=run_id, intent=intent)
    except ProviderError as error:
        return error


def _handle_orphan(c: JobContext, run_id: int, intent: PaymentIntent) -> Counter[str]:
    try:
        return payment_intent_sweep.handle_orphan(c.gateways.stripe, intent, run_id=run_id)
    except ProviderError as error:
        log.warning("PaymentIntent %s not synced: %s", intent.id, error.detail)
        return Counter({"provider_errors": 1})


def _settle(c: JobContext, counts: Counter[str], settle: Callable[[Session], Counter[str]]) -> None:
    """One order's short transaction. A row another session holds past the
    lock timeout (DB_LOCK_TIMEOUT_SECONDS) leaves that order for the next
    run, counted, rather than failing the whole run."""
    try:
        with c.sessions.begin() as session:
            counts.update(settle(session))
    except OperationalError as error:
        if getattr(error.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
            raise
        log.warning("a row stayed locked elsewhere; left for the next run: %s", error.orig)
        counts["locked_elsewhere"] += 1


LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's lock_not_available (lock_timeout, NOWAIT)


def _take(items: Any, size: int, *, skip: set[str]) -> list[Any]:
    batch: list[Any] = []
    for item in items:
        if item.id not in skip:
            batch.append(item)
        if len(batch) == size:
            break
    return batch


def _clean_expired_carts(c: JobContext, run: StartedRun, counts: Counter[str]) -> None:
    while True:
        with c.sessions.begin() as session:
            deleted = carts.delete_expired_carts(session, c.clock())
        counts["carts_deleted"] += deleted
        if deleted == 0:
            return


def _request_reviews(c: JobContext, run: StartedRun, counts: Counter[str]) -> None:
    # A scheduled run asks about the week before its slot, so a late
    # catch-up run covers the same orders the on-time run would have.
    reference = run.slot or c.clock()
    while True:
        with c.sessions.begin() as session:
            batch, to_send = review_requests.request_reviews(
                session, reference, run.id, trace_id=run.trace_id
            )
        counts.update(batch)
        counts["published"] += _publish_requests(c, dict.fromkeys(to_send, run.trace_id))
        if not to_send and not batch:
            break
    # Requests recorded by an earlier run whose message never left.
    with c.sessions() as session:
        stale = review_requests.unsent_review_requests(session, c.clock() - timedelta(minutes=10))
    counts["republished"] += _publish_requests(c, stale)
    # Sends whose worker vanished mid-call: failed, outcome unknown (never resent).
    with c.sessions.begin() as session:
        unknown = review_requests.fail_stale_sends(session, c.clock() - send_stale_after(c.settings))
    if unknown:
        counts[review_requests.OUTCOME_UNKNOWN] += unknown


def _publish_requests(c: JobContext, requests: dict[int, str | None]) -> int:
    """{request id: trace id}: each send carries the trace of the run that recorded it."""
    return len(c.sender.send([(rid, review_request_message(rid, trace)) for rid, trace in requests.items()]))


def _release_expired_reservations(c: JobContext, run: StartedRun, counts: Counter[str]) -> None:
    ttl = timedelta(seconds=c.settings.reservation_ttl_seconds)
    after: uuid.UUID | None = None
    while True:
        with c.sessions.begin() as session:
            batch, after = stock.release_expired_reservations(session, c.clock(), ttl, after=after)
        counts.update(batch)
        if after is None:
            return


def _archive_dead_letters(c: JobContext, run: StartedRun, counts: Counter[str]) -> None:
    # RabbitMQ drops a dead letter after DEAD_LETTER_TTL_SECONDS without a
    # word: letters are moved into PostgreSQL long before that.
    age = timedelta(seconds=c.settings.dead_letter_archive_after_seconds)
    counts.update(dead_letter_queues.archive_older_than(c.settings, c.sessions, age))


WORK: dict[str, Work] = {
    "expire-stale-orders": _expire_stale_orders,
    "cleanup-stale-payment-intents": _cleanup_stale_payment_intents,
    "clean-expired-carts": _clean_expired_carts,
    "request-reviews": _request_reviews,
    "release-expired-reservations": _release_expired_reservations,
    "archive-dead-letters": _archive_dead_letters,
}


class JobRunner:
    """Runs one job run under the job's advisory lock and records it."""

    def __init__(self, context: JobContext, table: JobTable) -> None:
        self._c, self._table = context, table
        bind = context.sessions.kw["bind"]
        assert isinstance(bind, Engine)
        self._engine = bind

    def execute(self, run_id: int) -> str:
        with self._engine.connect() as lock:
            started = self._start(lock, run_id)
            if not isinstance(started, StartedRun):
                return started
            try:
                with _traced(started.trace_id):
                    return self._run(started)
            finally:
                lock.execute(
                    text("SELECT pg_advisory_unlock(hashtext('payfleet-job'), hashtext(:job))"),
                    {"job": started.job},
                )
                lock.commit()

    def _start(self, lock: Connection, run_id: int) -> StartedRun | str:
        """Lock the run row, then try the job's lock, then skip or begin, all
        in one transaction: a duplicate delivery waits on the row lock and
        then finds the run `running` (or finished), never `queued`."""
        with self._c.sessions() as session:
            found = job_runs.lock_state(session, run_id)
            if found is None:
                return "missing"
            job, state = found
            if state in job_runs.FINISHED:
                return state
            if not _try_lock(lock, job):
                skipped = job_runs.skip_if_queued(session, run_id, f"another run of {job} was in progress")
                session.commit()
                return "skipped" if skipped else "in progress elsewhere"
            run = job_runs.begin(session, run_id)
            session.commit()
        assert run is not None
        return run

    def _run(self, run: StartedRun) -> str:
        counts: Counter[str] = Counter()
        started = time.monotonic()
        try:
            WORK[run.job](self._c, run, counts)
        except payment_intent_sweep.NotConfigured as reason:
            self._finish(run, "skipped", counts, f"skipped: {reason}", started)
            return "skipped"
        except BaseException as failure:
            # Dramatiq's TimeLimitExceeded is a BaseException: the run is
            # recorded failed whatever stopped it, then the interruption goes
            # on. The batches already committed stay done; the counts say how
            # far it got.
            log.exception("job %s run %s failed", run.job, run.id)
            self._finish(run, "failed", counts, f"{type(failure).__name__}: {failure}", started)
            if not isinstance(failure, Exception):
                raise
            return "failed"
        self._finish(run, "succeeded", counts, None, started)
        return "succeeded"

    def _finish(
        self, run: StartedRun, state: str, counts: Counter[str], error: str | None, started: float
    ) -> None:
        with self._c.sessions.begin() as session:
            job_runs.finish(session, run.id, state, counts, error)
        log.info(
            "job %s run %s %s in %.2fs: %s", run.job, run.id, state, time.monotonic() - started, dict(counts)
        )


@contextmanager
def _traced(trace_id: str | None) -> Iterator[None]:
    """The run's own trace id on its log lines and provider calls, read from
    its row: a message published without it (or a run executed in place)
    is traced all the same."""
    if trace_id is None:  # a run recorded before runs had trace ids
        yield
        return
    calls = gateways.trace_calls(trace_id)
    try:
        with logs.log_context(trace_id=trace_id):
            yield
    finally:
        gateways.untrace_calls(calls)


def _try_lock(connection: Connection, job: str) -> bool:
    # A session-level lock outlives the transaction, so commit straight away:
    # the connection then holds the lock without sitting idle in a transaction.
    locked = connection.execute(
        text("SELECT pg_try_advisory_lock(hashtext('payfleet-job'), hashtext(:job))"), {"job": job}
    ).scalar()
    connection.commit()
    return bool(locked)


def declare_job_actors(
    broker: Broker, sessions: sessionmaker[Session], settings: Settings, gateways: JobGateways
) -> JobRunner:
    table = job_table(settings)
    context = JobContext(sessions, settings, gateways, Publisher(broker), lambda: datetime.now(UTC))
    runner = JobRunner(context, table)
    for job in table.jobs:
        _declare_job(broker, job.actor, runner, settings)
    declare_review_sender(broker, sessions, settings, gateways.whatsapp)
    return runner


def _declare_job(broker: Broker, actor_name: str, runner: JobRunner, settings: Settings) -> None:
    def run_job(run_id: int) -> None:
        log.info("%s run %s: %s", actor_name, run_id, runner.execute(run_id))

    # A failed job is recorded on its run, not retried: the next slot runs it
    # again. Retries only cover failing to record (PostgreSQL down), and a
    # redelivery after that finds the run still `running` and runs it again.
    # A run stopped by its time limit is recorded failed: not retried either.
    dramatiq.actor(
        broker=broker,
        actor_name=actor_name,
        queue_name=JOBS_QUEUE,
        max_retries=3,
        retry_delays=(5_000, 30_000, 60_000),
        time_limit=int(settings.job_time_limit_seconds * 1000),
        throws=(TimeLimitExceeded,),
    )(run_job)
