"""Dead letters: the messages Dramatiq gave up on, in `<queue>.XQ`, and the
archive in PostgreSQL that keeps them past RabbitMQ's TTL.

Reading takes every letter of a queue without acknowledging it (closing the
channel gives back whatever was not acknowledged), so listing removes
nothing and a failure midway leaves every letter where it was. Moving a
letter (requeue, archive) commits its new home first, then acknowledges it:

- a requeue makes the letter's work runnable again (reopens its event, job
  run or review request: committed), publishes it back to its queue with a
  fresh retry budget, waits for RabbitMQ's confirm, then acknowledges;
- an archive inserts the letter (committed; a second insert of the same
  message id is a no-op), then acknowledges.

A crash between the two steps leaves the letter in place, and doing it again
is harmless: a reopened row is reopened again as a no-op, every consumer
takes a duplicate message as one, and an archived message id is kept once."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pika.exceptions
from dramatiq import Message
from dramatiq.common import xq_name
from dramatiq.errors import DecodeError
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from domain import events, job_runs, review_requests
from domain.errors import DomainError
from domain.models import ArchivedDeadLetter, ProviderEvent, ReviewRequest, ScheduledRun
from payfleet.platform.broker import with_connection_defaults
from payfleet.platform.config import Settings, job_table
from payfleet.platform.publishing import APPLY_EVENT, QUEUES, SEND_REVIEW_REQUEST

UNDECODABLE = "(undecodable)"
# How long a listing waits for the next letter before asking whether any is left.
FETCH_PAUSE_SECONDS = 0.2
# Options a requeued message must not carry on: its retry budget starts
# again, and the last failure's traceback and delay belong to the past.
SPENT_OPTIONS = ("retries", "traceback", "requeue_timestamp", "eta")


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    message_id: str
    actor: str
    args: tuple[Any, ...]
    retries: int
    error: str
    dead_at: datetime | None
    body: bytes = dataclasses.field(repr=False)
    headers: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    archived_at: datetime | None = None

    @property
    def message(self) -> Message[Any] | None:
        try:
            return Message.decode(self.body)
        except DecodeError:
            return None

    def age(self, now: datetime) -> timedelta | None:
        return now - self.dead_at if self.dead_at else None

    def summary(self, now: datetime) -> dict[str, Any]:
        age = self.age(now)
        view = {
            "queue": self.queue,
            "message_id": self.message_id,
            "actor": self.actor,
            "args": list(self.args),
            "retries": self.retries,
            "age_seconds": int(age.total_seconds()) if age is not None else None,
            "dead_at": self.dead_at.isoformat() if self.dead_at else None,
            "error": self.error,
        }
        if self.archived_at:
            view["archived_at"] = self.archived_at.isoformat()
        return view


@dataclass(frozen=True)
class LetterFilter:
    """Which letters a command takes: all of them unless narrowed. `error`
    is a case-insensitive part of the last error line."""

    actor: str | None = None
    error: str | None = None
    older_than: timedelta | None = None
    message_ids: frozenset[str] | None = None
    limit: int | None = None

    def matches(self, letter: DeadLetter, now: datetime) -> bool:
        age = letter.age(now)
        return (
            (self.actor is None or letter.actor == self.actor)
            and (self.error is None or self.error.casefold() in letter.error.casefold())
            and (self.older_than is None or (age is not None and age >= self.older_than))
            and (self.message_ids is None or letter.message_id in self.message_ids)
        )

    def take(self, letters: Iterable[DeadLetter], now: datetime) -> list[DeadLetter]:
        chosen = [letter for letter in letters if self.matches(letter, now)]
        return chosen[: self.limit] if self.limit is not None else chosen


EVERY_LETTER = LetterFilter()


# --- reading a letter -----------------------------------------------------------


def _letter(queue: str, properties: pika.BasicProperties, body: bytes) -> DeadLetter:
    headers = _jsonable(properties.headers or {})
    dead_at = _dead_at(properties.headers or {})
    try:
        message = Message.decode(body)
    except DecodeError as error:
        # Published by hand or corrupted: shown as such, never fatal.
        key = properties.message_id or "sha256:" + hashlib.sha256(body).hexdigest()[:32]
        return DeadLetter(queue, key, UNDECODABLE, (), 0, f"{error}: {body[:200]!r}", dead_at, body, headers)
    traceback = str(message.options.get("traceback") or "").strip()
    return DeadLetter(
        queue,
        message.message_id,
        message.actor_name,
        tuple(message.args),
        int(message.options.get("retries", 0)),
        traceback.splitlines()[-1] if traceback else "",
        dead_at or _utc_millis(message.message_timestamp),
        body,
        headers,
    )


def _dead_at(headers: dict[str, Any]) -> datetime | None:
    """When RabbitMQ dead-lettered it: the newest x-death entry's time."""
    deaths = headers.get("x-death") or []
    times = [death["time"] for death in deaths if isinstance(death, dict) and death.get("time")]
    if not times:
        return None
    newest: datetime = max(times)
    # pika decodes AMQP timestamps as naive UTC.
    return newest if newest.tzinfo else newest.replace(tzinfo=UTC)


def _utc_millis(millis: int) -> datetime:
    return datetime.fromtimestamp(millis / 1000, UTC)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


# --- the letters' recorded errors ------------------------------------------------

Explain = Callable[[list[DeadLetter]], list[DeadLetter]]


def recorded_errors(sessions: sessionmaker[Session], job_actors: frozenset[str]) -> Explain:
    """Fills a letter's error from its row when the message carries none.
    Dramatiq dead-letters the message as it was delivered: the traceback in
    it is the previous attempt's, and a failure that is never retried (a
    job's time limit, a refused number) carries none at all. The event, run
    or review request recorded the last failure itself."""

    # Where each actor's row keeps its last failure: (error column, id column).
    columns: dict[str, tuple[Any, Any]] = {
        APPLY_EVENT: (ProviderEvent.last_error, ProviderEvent.id),
        SEND_REVIEW_REQUEST: (ReviewRequest.last_error, ReviewRequest.id),
    }
    columns |= dict.fromkeys(job_actors, (ScheduledRun.error, ScheduledRun.id))

    def recorded(session: Session, letter: DeadLetter) -> str | None:
        error_column, id_column = columns[letter.actor]
        lines = (session.scalar(select(error_column).where(id_column == _row_id(letter))) or "").strip()
        return lines.splitlines()[-1] if lines else None

    def explain(letters: list[DeadLetter]) -> list[DeadLetter]:
        wanted = [x for x in letters if not x.error and x.actor in columns and _row_id(x) is not None]
        if not wanted:
            return letters
        with sessions() as session:
            found = {letter.message_id: error for letter in wanted if (error := recorded(session, letter))}
        return [
            dataclasses.replace(x, error=found[x.message_id]) if x.message_id in found else x for x in letters
        ]

    return explain


def _row_id(letter: DeadLetter) -> int | None:
    first = letter.args[0] if letter.args else None
    return first if isinstance(first, int) and not isinstance(first, bool) else None


def job_actors(settings: Settings) -> frozenset[str]:
    return frozenset(job.actor for job in job_table(settings).jobs)


# --- making a letter's work run again --------------------------------------------

# None: the letter may go back (its work will run); else why it stays.
Revive = Callable[[DeadLetter, bool], str | None]
Reopen = Callable[[Session, int], str | None]


def _reopen_event(session: Session, event_id: int) -> str | None:
    try:
        events.reopen(session, event_id)
    except DomainError as refused:
        return refused.detail
    return None


def reviver(sessions: sessionmaker[Session], job_actors: frozenset[str]) -> Revive:
    """Makes the row a letter is about runnable again, so the requeued
    message does its work instead of finding it settled and doing nothing:
    an event reopened, a failed job run queued again, a failed review
    request pending again. With `dry_run` the same checks run and are rolled
    back: a dry run reports exactly what a real one would do."""
    reopeners: dict[str, Reopen] = {
        APPLY_EVENT: _reopen_event,
        SEND_REVIEW_REQUEST: review_requests.reopen_failed,
    }
    reopeners |= dict.fromkeys(job_actors, job_runs.reopen_failed)

    def revive(letter: DeadLetter, dry_run: bool) -> str | None:
        if letter.actor == UNDECODABLE:
            return "not a Dramatiq message; nothing to run"
        reopen = reopeners.get(letter.actor)
        if reopen is None:
            return None  # no row of ours behind it: it goes back as it is
        row_id = _row_id(letter)
        if row_id is None:
            return f"{letter.actor} expects a row id, got {list(letter.args)!r}"
        with sessions() as session:
            reason = reopen(session, row_id)
            if dry_run or reason:
                session.rollback()
            else:
                session.commit()
        return reason

    return revive


# --- RabbitMQ --------------------------------------------------------------------


def parameters_for(settings: Settings) -> pika.URLParameters:
    return pika.URLParameters(with_connection_defaults(settings.broker_url))


@contextmanager
def _channel(parameters: pika.connection.Parameters) -> Iterator[BlockingChannel]:
    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        yield channel
    finally:
        # Closing returns every letter fetched but not acknowledged (and so
        # does a connection that is lost: there is nothing to close then).
        with contextlib.suppress(pika.exceptions.AMQPError):
            if connection.is_open:
                connection.close()


def _depth(channel: BlockingChannel, queue: str) -> int:
    """Letters in a queue; 0 if it was never declared (no worker ran yet).
    Asked on a channel of its own: RabbitMQ closes a channel that asks
    about a queue it does not have."""
    probe = channel.connection.channel()
    try:
        return int(probe.queue_declare(queue, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if probe.is_open:
            probe.close()


def _fetch(channel: BlockingChannel, queue: str) -> list[tuple[int, DeadLetter]]:
    """Every letter of `queue` now, unacknowledged: (delivery tag, letter).
    Bounded by the depth at the start, so letters that die again while a
    requeue runs are not taken a second time.

    One consumer takes them (RabbitMQ pushes the letters without waiting to
    be asked for each): a basic_get per letter cost a round trip each, about
    1.5 s for 5,000 letters. The consumer is cancelled once the depth is
    reached; letters pushed beyond it are handed back at once."""
    letter_queue = xq_name(queue)
    wanted = _depth(channel, letter_queue)
    fetched: list[tuple[int, DeadLetter]] = []
    if not wanted:
        return fetched
    letters = channel.consume(letter_queue, auto_ack=False, inactivity_timeout=FETCH_PAUSE_SECONDS)
    try:
        for method, properties, body in letters:
            if method is None:
                # A pause: done if none is left to push (fewer than the
                # depth said: expired, or taken by another consumer).
                if _depth(channel, letter_queue) == 0:
                    break
                continue
            fetched.append((method.delivery_tag, _letter(queue, properties, body)))
            if len(fetched) == wanted:
                break
    finally:
        # On a lost connection the error that lost it is the one to see.
        with contextlib.suppress(pika.exceptions.AMQPError):
            channel.cancel()
    return fetched


def _chosen(
    channel: BlockingChannel, queues: Sequence[str], chosen: LetterFilter, explain: Explain, now: datetime
) -> list[tuple[int, DeadLetter]]:
    fetched = [item for queue in queues for item in _fetch(channel, queue)]
    # explain keeps the order, so each letter stays paired with its tag (a
    # message id may be there twice: a requeued letter that died again).
    explained = explain([letter for _, letter in fetched])
    pairs = [(tag, letter) for (tag, _), letter in zip(fetched, explained, strict=True)]
    taken = [(tag, letter) for tag, letter in pairs if chosen.matches(letter, now)]
    return taken[: chosen.limit] if chosen.limit is not None else taken


def _unexplained(letters: list[DeadLetter]) -> list[DeadLetter]:
    return letters


def list_dead(
    parameters: pika.connection.Parameters,
    queues: Sequence[str] = QUEUES,
    chosen: LetterFilter = EVERY_LETTER,
    *,
    explain: Explain = _unexplained,
    now: datetime | None = None,
) -> list[DeadLetter]:
    """The letters of `queues` that `chosen` takes. Nothing is removed."""
    with _channel(parameters) as channel:
        return [letter for _, letter in _chosen(channel, queues, chosen, explain, now or _now())]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Outcome:
    """What a requeue moved, and what it left (with the reason)."""

    moved: list[DeadLetter] = dataclasses.field(default_factory=list)
    left: list[tuple[DeadLetter, str]] = dataclasses.field(default_factory=list)


def _fresh(letter: DeadLetter) -> Message[Any]:
    message = letter.message
    assert message is not None  # revive refuses undecodable letters
    options = {key: value for key, value in message.options.items() if key not in SPENT_OPTIONS}
    return dataclasses.replace(message, queue_name=letter.queue, options={**options, "retries": 0})


def _publish(channel: BlockingChannel, letter: DeadLetter) -> str | None:
    """Publishes a letter's message back to its queue and waits for the
    confirm; returns why it was not confirmed, if it was not."""
    fresh = _fresh(letter)
    properties = pika.BasicProperties(delivery_mode=2, priority=fresh.options.get("broker_priority"))
    try:
        channel.basic_publish("", letter.queue, fresh.encode(), properties, mandatory=True)
    except pika.exceptions.UnroutableError:
        return f"RabbitMQ has no queue {letter.queue!r} to put it in (start a worker first)"
    except pika.exceptions.NackError:
        return f"RabbitMQ refused to take it back on {letter.queue!r} (the queue may be full)"
    return None


Progress = Callable[[int, int], None]


def _no_progress(done: int, total: int) -> None:
    pass


def requeue(
    parameters: pika.connection.Parameters,
    revive: Revive,
    queues: Sequence[str] = QUEUES,
    chosen: LetterFilter = EVERY_LETTER,
    *,
    dry_run: bool = False,
    explain: Explain = _unexplained,
    pace: Callable[[], None] = lambda: None,
    progress: Progress = _no_progress,
) -> Outcome:
    """Moves the letters `chosen` takes back to their queue, each only once
    its work is runnable again (see `reviver`) and RabbitMQ confirmed it.
    A letter that cannot go is left in place, with the reason. A lost
    connection stops the requeue: what was moved is moved, the rest stays."""
    outcome = Outcome()
    with _channel(parameters) as channel:
        letters = _chosen(channel, queues, chosen, explain, _now())
        for done, (tag, letter) in enumerate(letters, 1):
            try:
                # Paced before the reopen, so the publish follows it at once.
                if not dry_run:
                    pace()
                reason = revive(letter, dry_run)
                if reason is None and not dry_run:
                    reason = _publish(channel, letter)
                    if reason is None:
                        channel.basic_ack(tag)
            except pika.exceptions.AMQPError as lost:
                # Unconfirmed or unacknowledged: still a dead letter (a
                # reopened row is only runnable, and is reopened again next time).
                why = f"connection to RabbitMQ lost ({type(lost).__name__}); left in place"
                outcome.left += [(rest, why) for _, rest in letters[done - 1 :]]
                break
            if reason is None:
                outcome.moved.append(letter)
            else:
                outcome.left.append((letter, reason))
            progress(done, len(letters))
    return outcome


def purge(parameters: pika.connection.Parameters, queues: Sequence[str] = QUEUES) -> dict[str, int]:
    """Deletes every letter of `queues` for good; how many, by queue."""
    removed: dict[str, int] = {}
    with _channel(parameters) as channel:
        for queue in queues:
            if _depth(channel, xq_name(queue)):
                removed[queue] = int(channel.queue_purge(xq_name(queue)).method.message_count)
            else:
                removed[queue] = 0
    return removed


# --- the archive -----------------------------------------------------------------

ARCHIVE_BATCH = 100


def _row(letter: DeadLetter) -> dict[str, Any]:
    return {
        "message_id": letter.message_id[:255],
        "queue": letter.queue,
        "actor": letter.actor[:255],
        "body": letter.body,
        "headers": letter.headers,
        "error": letter.error,
        "dead_at": letter.dead_at,
    }


def archive(
    parameters: pika.connection.Parameters,
    sessions: sessionmaker[Session],
    queues: Sequence[str] = QUEUES,
    chosen: LetterFilter = EVERY_LETTER,
    *,
    dry_run: bool = False,
    explain: Explain = _unexplained,
    progress: Progress = _no_progress,
) -> list[DeadLetter]:
    """Moves the letters `chosen` takes into dead_letter_archive: each batch
    is committed, then its letters acknowledged. A letter archived before
    (the ack was lost) is not stored twice."""
    with _channel(parameters) as channel:
        letters = _chosen(channel, queues, chosen, explain, _now())
        if dry_run:
            return [letter for _, letter in letters]
        for start in range(0, len(letters), ARCHIVE_BATCH):
            batch = letters[start : start + ARCHIVE_BATCH]
            with sessions.begin() as session:
                session.execute(
                    insert(ArchivedDeadLetter)
                    .values([_row(letter) for _, letter in batch])
                    .on_conflict_do_nothing(index_elements=["message_id"])
                )
            for tag, _ in batch:
                channel.basic_ack(tag)
            progress(start + len(batch), len(letters))
    return [letter for _, letter in letters]


def archive_older_than(settings: Settings, sessions: sessionmaker[Session], age: timedelta) -> Counter[str]:
    """The scheduled archive: every letter dead for `age` or more, so none
    expires unseen under RabbitMQ's TTL. Counts by queue."""
    explain = recorded_errors(sessions, job_actors(settings))
    moved = archive(parameters_for(settings), sessions, chosen=LetterFilter(older_than=age), explain=explain)
    return Counter(f"archived_{letter.queue}" for letter in moved)


def _archived(row: ArchivedDeadLetter) -> DeadLetter:
    letter = _letter(row.queue, pika.BasicProperties(message_id=row.message_id), row.body)
    return dataclasses.replace(
        letter,
        message_id=row.message_id,
        error=letter.error or row.error,
        dead_at=row.dead_at,
        headers=row.headers,
        archived_at=row.archived_at,
    )


def list_archived(
    sessions: sessionmaker[Session],
    queues: Sequence[str] = QUEUES,
    chosen: LetterFilter = EVERY_LETTER,
    *,
    now: datetime | None = None,
) -> list[DeadLetter]:
    query = (
        select(ArchivedDeadLetter).where(ArchivedDeadLetter.queue.in_(queues)).order_by(ArchivedDeadLetter.id)
    )
    with sessions() as session:
        letters = [_archived(row) for row in session.scalars(query)]
    return chosen.take(letters, now or _now())


def requeue_archived(
    parameters: pika.connection.Parameters,
    sessions: sessionmaker[Session],
    revive: Revive,
    queues: Sequence[str] = QUEUES,
    chosen: LetterFilter = EVERY_LETTER,
    *,
    dry_run: bool = False,
    pace: Callable[[], None] = lambda: None,
    progress: Progress = _no_progress,
) -> Outcome:
    """requeue, from the archive: a letter's row is deleted once RabbitMQ
    confirmed its message (if it dies again, it can be archived again)."""
    outcome = Outcome()
    letters = list_archived(sessions, queues, chosen)
    with _channel(parameters) as channel:
        for done, letter in enumerate(letters, 1):
            if not dry_run:
                pace()
            reason = revive(letter, dry_run)
            if reason is None and not dry_run:
                reason = _publish(channel, letter)
            if reason is None:
                if not dry_run:
                    with sessions.begin() as session:
                        session.execute(
                            delete(ArchivedDeadLetter).where(
                                ArchivedDeadLetter.message_id == letter.message_id
                            )
                        )
                outcome.moved.append(letter)
            else:
                outcome.left.append((letter, reason))
            progress(done, len(letters))
    return outcome


def purge_archived(sessions: sessionmaker[Session], queues: Sequence[str] = QUEUES) -> int:
    with sessions.begin() as session:
        removed = session.execute(
            delete(ArchivedDeadLetter)
            .where(ArchivedDeadLetter.queue.in_(queues))
            .returning(ArchivedDeadLetter.id)
        )
        return len(removed.all())


def summarize(letters: Sequence[DeadLetter], now: datetime) -> dict[str, Any]:
    """Counts by actor and by last error line, and the oldest letter's age."""
    ages = [age for letter in letters if (age := letter.age(now)) is not None]
    return {
        "count": len(letters),
        "oldest_age_seconds": int(max(ages).total_seconds()) if ages else None,
        "by_actor": dict(Counter(letter.actor for letter in letters).most_common()),
        "by_error": dict(Counter(letter.error or "(none recorded)" for letter in letters).most_common()),
    }
