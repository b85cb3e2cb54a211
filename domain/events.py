"""Provider events: stored once, applied once.

Storing is idempotent through the unique `(provider, event_key)`; applying
locks the event row and writes its processed mark in the same transaction as
its effects, so a redelivered message finds the mark and does nothing.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeAlias, cast

from sqlalchemy import Connection, Table, bindparam, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.orm import Session

from domain.bulk import Write, any_of
from domain.errors import (
    ConfirmationNeeded,
    Conflict,
    InvalidRequest,
    NotFound,
    PaymentNotConfirmed,
    PaymentNotFound,
)
from domain.gateways import MonetbilCheck
from domain.models import Payment, ProviderEvent
from domain.orders import PaymentChange, apply_payment_status, plan_payment_changes


@dataclass(frozen=True)
class EventFacts:
    """What ingress extracts from a verified event before storing it."""

    provider: str
    event_key: str
    event_type: str
    provider_payment_id: str | None
    payload: dict[str, Any]
    # The provider's request id where it sends one (stripe_event_facts), else
    # a fresh one: it follows the event into every attempt and provider call.
    trace_id: str = dataclass_field(default_factory=lambda: new_trace_id())


def new_trace_id() -> str:
    """A trace id of payfleet's own, where no provider gave one."""
    return uuid.uuid4().hex


# The widest trace id kept (provider_events.trace_id); a provider's longer
# request id is not taken as the trace.
TRACE_ID_MAX = 64


# Every webhook runs these two: Core statements built once, executed on the
# session's connection (the ORM's bulk insert/update bookkeeping cost more
# than the statements).
_EVENTS = cast(Table, ProviderEvent.__table__)
_PAYMENTS = cast(Table, Payment.__table__)
_RECORD = (
    insert(_EVENTS).on_conflict_do_nothing(index_elements=["provider", "event_key"]).returning(_EVENTS.c.id)
)
_FIND = select(_EVENTS.c.id).where(
    _EVENTS.c.provider == bindparam("provider"), _EVENTS.c.event_key == bindparam("event_key")
)
# Many events in one statement, sent as one JSON array of objects: a text[]
# of payloads made psycopg escape every quote of every payload in Python
# (re.sub with a template per match: 6-8 % of the ingress's time at 16
# connections), where one json.dumps of the batch runs in C.
_RECORD_MANY = text(
    "INSERT INTO provider_events"
    " (provider, event_key, event_type, provider_payment_id, payload, status, attempts, trace_id)"
    " SELECT provider, event_key, event_type, payment_id, payload, 'received', 0, trace_id"
    " FROM jsonb_to_recordset(CAST(:events AS jsonb)) AS event (provider varchar, event_key varchar,"
    " event_type varchar, payment_id varchar, payload jsonb, trace_id varchar)"
    # One insertion order for every batch: two batches committing side by
    # side with the same keys then wait on each other, never in a cycle.
    " ORDER BY provider, event_key"
    " ON CONFLICT (provider, event_key) DO NOTHING"
    " RETURNING id, provider, event_key"
)
_FIND_MANY = text(
    "SELECT id, provider, event_key FROM provider_events"
    " JOIN unnest(CAST(:providers AS varchar[]), CAST(:event_keys AS varchar[])) AS wanted (p, k)"
    " ON provider = wanted.p AND event_key = wanted.k"
)
# The rows locked in id order first, as the worker's batches lock them: an
# UPDATE visits rows in whatever order its plan takes, and a mark locking two
# events one way while a batch locks them the other would deadlock.
_MARK_PUBLISHED = (
    update(_EVENTS)
    .where(
        _EVENTS.c.id.in_(
            select(_EVENTS.c.id)
            .where(any_of(_EVENTS.c.id, "ids"))
            .order_by(_EVENTS.c.id)
            .with_for_update()
            .scalar_subquery()
        )
    )
    .values(published_at=func.now())
)


def _connection(db: Session | Connection) -> Connection:
    return db.connection() if isinstance(db, Session) else db


def record_event(db: Session | Connection, facts: EventFacts) -> tuple[int, bool]:
    """Store an event; returns (id, duplicate). Two racing deliveries of one
    event both succeed here: ON CONFLICT makes the loser a duplicate instead
    of an IntegrityError. Takes a plain connection too: the ingress stores
    without an ORM session (its bookkeeping was a tenth of a webhook's CPU)."""
    connection = _connection(db)
    row = {
        "provider": facts.provider,
        "event_key": facts.event_key,
        "event_type": facts.event_type,
        "provider_payment_id": facts.provider_payment_id,
        "payload": facts.payload,
        "status": "received",
        "attempts": 0,
        "trace_id": facts.trace_id,
    }
    inserted = connection.execute(_RECORD, row).scalar()
    if inserted is not None:
        return inserted, False
    existing = connection.execute(_FIND, {"provider": facts.provider, "event_key": facts.event_key})
    return existing.scalar_one(), True


def record_events(db: Session | Connection, batch: Sequence[EventFacts]) -> list[tuple[int, bool]]:
    """record_event for many events in one INSERT (and one SELECT for those
    already stored): (id, duplicate) for each, in order. An event given twice
    is stored once, and is a duplicate the second time."""
    if len(batch) == 1:
        return [record_event(db, batch[0])]  # plain parameters cost less than arrays of one
    connection = _connection(db)
    events = json.dumps(
        [
            {
                "provider": facts.provider,
                "event_key": facts.event_key,
                "event_type": facts.event_type,
                "payment_id": facts.provider_payment_id,
                "payload": facts.payload,
                "trace_id": facts.trace_id,
            }
            for facts in batch
        ]
    )
    inserted = {
        (row.provider, row.event_key): row.id for row in connection.execute(_RECORD_MANY, {"events": events})
    }
    known = dict(inserted)
    if missing := sorted({(facts.provider, facts.event_key) for facts in batch} - inserted.keys()):
        keys = {"providers": [provider for provider, _ in missing], "event_keys": [key for _, key in missing]}
        known |= {(row.provider, row.event_key): row.id for row in connection.execute(_FIND_MANY, keys)}
    answers, seen = [], set()
    for facts in batch:
        key = (facts.provider, facts.event_key)
        answers.append((known[key], key not in inserted or key in seen))
        seen.add(key)
    return answers


def mark_published(session: Session, event_ids: list[int]) -> None:
    session.connection().execute(_MARK_PUBLISHED, {"ids": list(event_ids)})


# --- Stripe -----------------------------------------------------------------


def _intent_id(obj: dict[str, Any]) -> str | None:
    return obj.get("id") if obj.get("object") == "payment_intent" else obj.get("payment_intent")


def stripe_event_facts(event: Any) -> EventFacts:
    """Check the shape of a (verified) Stripe event and pull out its keys."""
    if not isinstance(event, dict):
        raise InvalidRequest("event must be a JSON object")
    event_id, event_type, data = event.get("id"), event.get("type"), event.get("data")
    if not isinstance(event_id, str) or not event_id or not isinstance(event_type, str) or not event_type:
        raise InvalidRequest("event needs a string id and type")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise InvalidRequest("event needs data.object")
    intent = _intent_id(data["object"])
    payment_id = intent if isinstance(intent, str) else None
    trace_id = _request_id(event.get("request")) or new_trace_id()
    return EventFacts("stripe", event_id, event_type, payment_id, event, trace_id)


def _request_id(request: Any) -> str | None:
    """The id of the API request that caused a Stripe event (`req_…`): an
    object's `id` (a string before API version 2017-05-25); null for events
    no request caused (a payment completing on its own)."""
    found = request.get("id") if isinstance(request, dict) else request
    if isinstance(found, str) and 0 < len(found) <= TRACE_ID_MAX and found.isprintable():
        return found
    return None


@dataclass(frozen=True)
class Target:
    """The payment status an event asks for. `final` marks a failure the
    customer cannot retry on the same payment: its stock is released."""

    status: str
    final: bool = False


Handler = Callable[[dict[str, Any]], Target | None]


def _charge_refunded(obj: dict[str, Any]) -> Target | None:
    # Stripe sends charge.refunded for partial refunds too; only a full refund
    # moves the payment, a partial one is stored and marked ignored.
    return Target("refunded") if obj.get("refunded") is True else None


def _always(status: str, *, final: bool = False) -> Handler:
    return lambda obj: Target(status, final)


# A Stripe payment_failed is not final: the customer may retry on the same
# PaymentIntent, so the reservation is kept until the payment window ends.
STRIPE_HANDLERS: dict[str, Handler] = {
    "payment_intent.succeeded": _always("succeeded"),
    "payment_intent.payment_failed": _always("failed"),
    "payment_intent.canceled": _always("canceled"),
    "payment_intent.processing": _always("processing"),
    "charge.refunded": _charge_refunded,
}

# Monetbil's event type is its callback status; failed and cancelled are final.
MONETBIL_HANDLERS: dict[str, Handler] = {
    **dict.fromkeys(("success", "successful", "completed"), _always("succeeded")),
    **dict.fromkeys(("failed", "failure", "error"), _always("failed", final=True)),
    **dict.fromkeys(("pending", "processing"), _always("processing")),
    **dict.fromkeys(("cancelled", "canceled"), _always("canceled", final=True)),
}

HANDLERS = {"stripe": STRIPE_HANDLERS, "monetbil": MONETBIL_HANDLERS}


class MalformedEvent(Exception):
    """A stored event lacks the shape its provider's rules read (stored by
    an older version, or edited by hand): no retry will find it otherwise."""


def target_of(event: StoredEvent) -> Target | None:
    handler = HANDLERS[event.provider].get(event.event_type)
    return handler(_subject(event)) if handler else None


def _subject(event: StoredEvent) -> dict[str, Any]:
    """The object an event is about: Stripe's data.object, Monetbil's form."""
    payload = event.payload
    if event.provider == "stripe":
        data = payload.get("data") if isinstance(payload, dict) else None
        payload = data.get("object") if isinstance(data, dict) else None
    if not isinstance(payload, dict):
        where = "data.object" if event.provider == "stripe" else "the callback form"
        raise MalformedEvent(f"stored {event.provider} event has no {where} object")
    return payload


# --- Monetbil -----------------------------------------------------------------


def monetbil_event_facts(form: dict[str, str]) -> EventFacts:
    """Check a (verified) Monetbil callback and pull out its keys. The key is
    transaction and status, so a repeated callback is a duplicate while the
    same transaction's later status is a new event."""
    transaction_id, status = form.get("transaction_id", ""), form.get("status", "").strip().lower()
    if not transaction_id or not status:
        raise InvalidRequest("callback needs transaction_id and status")
    return EventFacts("monetbil", f"{transaction_id}:{status}", status, transaction_id, dict(form))


# --- applying -----------------------------------------------------------------


_EVENT_COLUMNS = (
    _EVENTS.c.id,
    _EVENTS.c.provider,
    _EVENTS.c.event_type,
    _EVENTS.c.status,
    _EVENTS.c.provider_payment_id,
    _EVENTS.c.payload,
)
_LOCK_EVENT = select(*_EVENT_COLUMNS).where(_EVENTS.c.id == bindparam("event_id")).with_for_update()
# A batch's events and the Stripe payments they name, locked in one
# statement and in the order two statements took them: the events sorted by
# id (two transactions given overlapping events lock them in one order), all
# of them before any payment, since the payments' lookup waits for the
# aggregate of every locked event; then the payments sorted by id. Each
# event row carries its payment's columns (NULL when none is found).
_LOCK_EVENTS_AND_PAYMENTS = text("""WITH locked_events AS MATERIALIZED (
    SELECT id, provider, event_type, status, provider_payment_id, payload
    FROM provider_events WHERE id = ANY(CAST(:event_ids AS bigint[]))
    ORDER BY id FOR UPDATE
), intents AS (
    SELECT array_agg(provider_payment_id) AS ids FROM locked_events
    WHERE provider = 'stripe' AND status = 'received'
), locked_payments AS MATERIALIZED (
    SELECT payments.id, payments.order_id, payments.status, payments.provider_payment_id
    FROM payments, intents
    WHERE payments.provider = 'stripe' AND payments.provider_payment_id = ANY(intents.ids)
    ORDER BY payments.id FOR UPDATE OF payments
)
SELECT locked_events.*, locked_payments.id AS payment_id,
    locked_payments.order_id AS payment_order_id, locked_payments.status AS payment_status
FROM locked_events LEFT JOIN locked_payments
    ON locked_events.provider = 'stripe'
    AND locked_payments.provider_payment_id = locked_events.provider_payment_id
ORDER BY locked_events.id
""")


@dataclass(frozen=True)
class _LockedPayment:
    """A payment as the batch's statement returned it beside its event."""

    id: uuid.UUID
    order_id: uuid.UUID
    status: str


_SETTLE = (
    update(_EVENTS)
    .where(_EVENTS.c.id == bindparam("event_id"))
    .values(
        status=bindparam("new_status"),
        processed_at=func.now(),
        attempts=_EVENTS.c.attempts + 1,
        payment_id=func.coalesce(bindparam("found", type_=_EVENTS.c.payment_id.type), _EVENTS.c.payment_id),
        last_error=func.coalesce(bindparam("error", type_=_EVENTS.c.last_error.type), _EVENTS.c.last_error),
    )
)


def apply_event(session: Session, event_id: int, confirmed: MonetbilCheck | None = None) -> str:
    """Apply a stored event to its payment, once. Returns the event's status
    afterwards; raises PaymentNotFound (retryable) when its payment is unknown.
    `confirmed` is the provider's own word on a claimed Monetbil success:
    without it such an event raises ConfirmationNeeded (a claimed success is
    never taken on the callback's word alone: the callback carries no
    timestamp and can be replayed); where it disagrees, it stands."""
    event = session.connection().execute(_LOCK_EVENT, {"event_id": event_id}).first()
    if event is None:
        return "missing"
    if event.status != "received":
        return str(event.status)
    target = target_of(event)
    if target is None:
        return _settle(session, event_id, "ignored")
    disagreement = None
    if event.provider == "monetbil" and target.status == "succeeded":
        if confirmed is None:
            raise ConfirmationNeeded(event.provider_payment_id or "")
        target, disagreement = _confirmed(event, confirmed)
    payment = FINDERS[event.provider](session, event)
    if payment is None and confirmed is not None and confirmed.status != "succeeded":
        # Monetbil itself says this claimed success is none: nothing will
        # ever be paid by it, so there is nothing to wait for.
        return _settle(session, event_id, "unmatched", error=disagreement)
    if payment is None:
        raise PaymentNotFound(
            f"no {event.provider} payment {event.provider_payment_id!r} for event {event_id}"
        )
    if confirmed and target.status == "succeeded" and not confirmed.covers(payment.amount, payment.currency):
        paid = f"{confirmed.amount} {confirmed.currency}"
        mismatch = f"Monetbil reports {paid} paid; the payment is {payment.amount} {payment.currency}"
        return _settle(session, event_id, "failed", payment.id, mismatch)
    # The processed mark first: one transaction either way, and the stock
    # rows the effects end with are then held only until the commit.
    _settle(session, event_id, "processed", payment.id, disagreement)
    reason = f"{event.provider} {event.event_type}"
    apply_payment_status(
        session, payment, target.status, reason=reason, event_id=event_id, final_failure=target.final
    )
    return "processed"


def apply_events(session: Session, event_ids: Sequence[int]) -> dict[int, str]:
    """apply_event for many events in one transaction, in a handful of
    statements however many there are: the common case of a Stripe event
    about a payment found by its PaymentIntent id. Returns the status of each
    event it settled (or found settled); an event it leaves out (Monetbil's,
    a payment not found that way, a second event about the same order, one
    that releases stock or sells it without a reservation) is untouched, for
    apply_event on its own. Each event is applied once either
    way: its verdict is written in the same transaction as its effects."""
    connection = session.connection()
    locked = connection.execute(_LOCK_EVENTS_AND_PAYMENTS, {"event_ids": sorted(set(event_ids))}).all()
    settled: dict[int, str] = {}
    verdicts: dict[int, tuple[str, uuid.UUID | None]] = {}
    stripe_events: list[tuple[Any, Target, _LockedPayment | None]] = []
    for event in locked:
        if event.status != "received":
            settled[event.id] = str(event.status)
            continue
        try:
            target = target_of(event)
        except MalformedEvent:
            continue  # left for apply_event alone: its error is its own, not the batch's
        if target is None:
            verdicts[event.id] = ("ignored", None)
        elif event.provider == "stripe" and event.provider_payment_id:
            payment = None
            if event.payment_id is not None:
                payment = _LockedPayment(event.payment_id, event.payment_order_id, event.payment_status)
            stripe_events.append((event, target, payment))
    changes, orders = [], set()
    for event, target, payment in stripe_events:
        if payment is None or payment.order_id in orders:
            continue
        orders.add(payment.order_id)
        verdicts[event.id] = ("processed", payment.id)
        reason = f"{event.provider} {event.event_type}"
        changes.append(PaymentChange(payment, target.status, reason, event.id, target.final))
    plan = plan_payment_changes(session, changes, batched=True)
    declined = {change.event_id for change in plan.declined}
    verdicts = {event_id: verdict for event_id, verdict in verdicts.items() if event_id not in declined}
    # The verdicts go in the same statement as the payments' own writes.
    plan.write(session, *([_verdicts_write(verdicts)] if verdicts else []))
    return settled | {event_id: status for event_id, (status, _) in verdicts.items()}


def _confirmed(event: StoredEvent, confirmed: MonetbilCheck | None) -> tuple[Target, str | None]:
    """The target check-payment allows, and the disagreement to keep on the
    event when it contradicts the callback."""
    status = confirmed.status if confirmed else None
    if status is None or status in ("pending", "processing"):
        # Not confirmed (yet): retried with backoff, never guessed.
        raise PaymentNotConfirmed(f"check-payment does not confirm transaction {event.provider_payment_id}")
    if status != "succeeded":
        return Target(
            status, final=True
        ), f"callback said success, check-payment says {status}; check-payment stands"
    return Target(status), None


def _settle(
    session: Session,
    event_id: int,
    status: str,
    payment_id: uuid.UUID | None = None,
    error: str | None = None,
) -> str:
    """The event's verdict, in the same transaction as its effects; its
    attempt is counted (a retried attempt is counted by record_failed_attempt)."""
    verdict = {"event_id": event_id, "new_status": status, "found": payment_id, "error": error}
    session.connection().execute(_SETTLE, verdict)
    return status


def _verdicts_write(verdicts: dict[int, tuple[str, uuid.UUID | None]]) -> Write:
    """The verdicts of many events (what _settle writes for one), as one write
    for the batch's combined statement: {event id: (status, payment id)}."""
    params = {
        "verdict_ids": list(verdicts),
        "verdict_statuses": [status for status, _ in verdicts.values()],
        "verdict_payment_ids": [payment_id for _, payment_id in verdicts.values()],
    }
    return Write(_SETTLE_MANY, params)


# One UPDATE for a batch's verdicts, passed as arrays (see orders._SetStatuses).
_SETTLE_MANY = (
    "UPDATE provider_events SET status = verdict.status, processed_at = now(), attempts = attempts + 1,"
    " payment_id = coalesce(verdict.payment_id, provider_events.payment_id)"
    " FROM unnest(CAST(:verdict_ids AS bigint[]), CAST(:verdict_statuses AS text[]),"
    " CAST(:verdict_payment_ids AS uuid[])) AS verdict (id, status, payment_id)"
    " WHERE provider_events.id = verdict.id"
)

_PAYMENT = select(
    _PAYMENTS.c.id,
    _PAYMENTS.c.order_id,
    _PAYMENTS.c.status,
    _PAYMENTS.c.amount,
    _PAYMENTS.c.currency,
    _PAYMENTS.c.provider_payment_id,
    _PAYMENTS.c.provider_reference,
).with_for_update()
_PAYMENT_BY_PROVIDER_ID = _PAYMENT.where(
    _PAYMENTS.c.provider == bindparam("provider"), _PAYMENTS.c.provider_payment_id == bindparam("provider_id")
)
_PAYMENT_BY_ID = _PAYMENT.where(
    _PAYMENTS.c.provider == bindparam("provider"), _PAYMENTS.c.id == bindparam("id")
)
_MONETBIL_PAYMENT = {
    "payment_ref": _PAYMENT.where(
        _PAYMENTS.c.provider == "monetbil", _PAYMENTS.c.order_id == bindparam("key")
    ),
    "transaction_id": _PAYMENT.where(
        _PAYMENTS.c.provider == "monetbil", _PAYMENTS.c.provider_payment_id == bindparam("key")
    ),
    "transaction_uuid": _PAYMENT.where(
        _PAYMENTS.c.provider == "monetbil", _PAYMENTS.c.provider_reference == bindparam("key")
    ),
}
_LEARN_IDS = (
    update(_PAYMENTS)
    .where(_PAYMENTS.c.id == bindparam("payment_id"))
    .values(
        provider_payment_id=func.coalesce(_PAYMENTS.c.provider_payment_id, bindparam("transaction_id")),
        provider_reference=func.coalesce(_PAYMENTS.c.provider_reference, bindparam("transaction_uuid")),
    )
)


def _find_stripe_payment(session: Session, event: StoredEvent) -> PaymentRow | None:
    connection = session.connection()
    if event.provider_payment_id:
        found = connection.execute(
            _PAYMENT_BY_PROVIDER_ID, {"provider": event.provider, "provider_id": event.provider_payment_id}
        ).first()
        if found is not None:
            return found
    # The webhook can beat the checkout's last commit (the one that stores the
    # PaymentIntent id); the intent's metadata names our payment directly.
    metadata = _subject(event).get("metadata")
    if not isinstance(metadata, dict):
        return None
    try:
        payment_id = uuid.UUID(str(metadata.get("payment_id")))
    except ValueError:
        return None
    return connection.execute(_PAYMENT_BY_ID, {"provider": event.provider, "id": payment_id}).first()


def _find_monetbil_payment(session: Session, event: StoredEvent) -> PaymentRow | None:
    """The payment a Monetbil event is about; it learns the identifiers it lacks."""
    payment = _match_monetbil_payment(session, event)
    if payment is not None:
        form = _subject(event)
        learned = {
            "transaction_id": form.get("transaction_id"),
            "transaction_uuid": form.get("transaction_uuid"),
        }
        session.connection().execute(_LEARN_IDS, {"payment_id": payment.id, **learned})
    return payment


def _match_monetbil_payment(session: Session, event: StoredEvent) -> PaymentRow | None:
    """By payment_ref (our order id), then transaction_id, then transaction_uuid."""
    form = _subject(event)
    keys: list[tuple[str, Any]] = []
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        keys.append(("payment_ref", uuid.UUID(form.get("payment_ref", ""))))
    keys += [(field, form[field]) for field in ("transaction_id", "transaction_uuid") if form.get(field)]
    for field, key in keys:
        payment = session.connection().execute(_MONETBIL_PAYMENT[field], {"key": key}).first()
        if payment is not None:
            return payment
    return None


# A payments row (id, order_id, status, amount, currency, provider ids),
# locked, as the finders read it with Core.
PaymentRow: TypeAlias = Any


class StoredEvent(Protocol):
    """A stored event as the rules read it (a row of provider_events)."""

    @property
    def provider(self) -> str: ...

    @property
    def event_type(self) -> str: ...

    @property
    def provider_payment_id(self) -> str | None: ...

    @property
    def payload(self) -> Any: ...


FINDERS: dict[str, Callable[[Session, StoredEvent], PaymentRow | None]] = {
    "stripe": _find_stripe_payment,
    "monetbil": _find_monetbil_payment,
}
# The same search, changing nothing (what give_up asks).
_MATCHERS: dict[str, Callable[[Session, StoredEvent], PaymentRow | None]] = {
    "stripe": _find_stripe_payment,
    "monetbil": _match_monetbil_payment,
}


# Errors a retry would meet again, whatever the wait: a stored payload
# without its shape, a state the rules refuse, a value PostgreSQL rejects
# (SQLSTATE class 22). The event actor fails them at once (`throws=`). Not
# every DomainError: a ProviderError (an outage) may pass.
UNCURABLE: tuple[type[Exception], ...] = (MalformedEvent, InvalidRequest, Conflict, NotFound, DataError)


def describe_failure(error: BaseException) -> str:
    """What an event keeps of a failed attempt, for the operator. A database
    error is named by its class, SQLSTATE and constraint, never by its text:
    PostgreSQL's messages quote the values of the row (emails, phones,
    payloads), which no stored reason may carry."""
    if isinstance(error, DBAPIError) and error.orig is not None:
        return _describe_database_error(error.orig)
    return f"{type(error).__name__}: {error}"[:2000]


def _describe_database_error(orig: BaseException) -> str:
    diag = getattr(orig, "diag", None)
    named = [
        f"{label} {value}"
        for label, value in (
            ("SQLSTATE", getattr(orig, "sqlstate", None)),
            ("constraint", getattr(diag, "constraint_name", None)),
            ("table", getattr(diag, "table_name", None)),
            ("column", getattr(diag, "column_name", None)),
        )
        if value
    ]
    return f"{type(orig).__name__} ({', '.join(named)})" if named else type(orig).__name__


def record_failed_attempt(session: Session, event_id: int, reason: str, *, final: bool = False) -> None:
    """Count a failed attempt and keep why. `final`: waiting cannot help, so
    the event is settled failed now instead of after its retries."""
    values: dict[str, Any] = {"attempts": ProviderEvent.attempts + 1, "last_error": reason[:2000]}
    if final:
        values |= {"status": "failed", "processed_at": func.now()}
    session.execute(
        update(ProviderEvent)
        .where(ProviderEvent.id == event_id, ProviderEvent.status == "received")
        .values(**values)
    )


def give_up(session: Session, event_id: int) -> str:
    """Retries are exhausted: settle the event as unmatched when its payment
    still cannot be found (it never appeared), failed otherwise. Decided by
    looking for the payment, not by reading last_error, which stays as the
    operator's reason."""
    event = session.get(ProviderEvent, event_id, with_for_update=True)
    if event is None or event.status != "received":
        return event.status if event else "missing"
    event.status = "failed" if _payment_known(session, event) else "unmatched"
    event.processed_at = datetime.now(UTC)
    return event.status


def _payment_known(session: Session, event: ProviderEvent) -> bool:
    try:
        return _MATCHERS[event.provider](session, event) is not None
    except MalformedEvent:
        return True  # nothing to match: a failure of its own, not a missing payment


def lock_unpublished(
    session: Session, *, grace: timedelta, stuck_after: timedelta, limit: int
) -> dict[int, str | None]:
    """Events the relay must (re)publish, locked so two schedulers split them:
    never published and older than `grace` (the ingress that stored them is
    not about to publish them itself), or published so long ago and still
    unprocessed that their message must have been lost. {id: trace id}, by id."""
    now = datetime.now(UTC)
    never = (ProviderEvent.published_at.is_(None)) & (ProviderEvent.received_at < now - grace)
    lost = ProviderEvent.published_at < now - stuck_after
    query = (
        select(ProviderEvent.id, ProviderEvent.trace_id)
        .where(ProviderEvent.status == "received", never | lost)
        .order_by(ProviderEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return {event_id: trace_id for event_id, trace_id in session.execute(query)}


REPLAYABLE = ("unmatched", "failed", "ignored")


def reopen(session: Session, event_id: int) -> ProviderEvent:
    """Make a settled-but-not-applied event applicable again (an operator's
    replay). A processed event is never reopened: it was applied once."""
    event = session.get(ProviderEvent, event_id, with_for_update=True)
    if event is None:
        raise NotFound(f"no event {event_id}")
    if event.status == "received":
        return event
    if event.status not in REPLAYABLE:
        raise Conflict(
            f"event {event_id} is {event.status}; only {', '.join(REPLAYABLE)} events are replayed"
        )
    event.status, event.processed_at, event.published_at = "received", None, None
    return event


# --- replays by filter ---------------------------------------------------------


@dataclass(frozen=True)
class ReplayFilter:
    """Which settled events an operator replays: one replayable status, and
    optionally a provider, an event type and a window of `received_at`
    (since inclusive, until exclusive)."""

    status: str
    provider: str | None = None
    event_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def replay_filter(
    status: str | None,
    provider: str | None = None,
    event_type: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> ReplayFilter:
    """Checks an operator's filter; InvalidRequest says what is wrong. A
    status is required, so a replay never takes every event by accident."""
    if status not in REPLAYABLE:
        raise InvalidRequest(f"status must be one of {', '.join(REPLAYABLE)}; got {status!r}")
    if provider is not None and provider not in HANDLERS:
        raise InvalidRequest(f"provider must be one of {', '.join(HANDLERS)}; got {provider!r}")
    if event_type is not None and not 0 < len(event_type) <= 128:
        raise InvalidRequest("type must be 1 to 128 characters")
    chosen = ReplayFilter(status, provider, event_type, _instant("since", since), _instant("until", until))
    if chosen.since and chosen.until and chosen.since >= chosen.until:
        raise InvalidRequest("since must be before until")
    return chosen


def _instant(name: str, value: str | None) -> datetime | None:
    """An ISO 8601 time; one without an offset is taken as UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise InvalidRequest(
            f"{name} must be an ISO 8601 time such as 2026-11-30T08:00:00Z; got {value!r}"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def replay_selection(session: Session, chosen: ReplayFilter) -> list[int]:
    """The ids of the events a filter replays, oldest first."""
    query = select(_EVENTS.c.id).where(_EVENTS.c.status == chosen.status).order_by(_EVENTS.c.id)
    if chosen.provider:
        query = query.where(_EVENTS.c.provider == chosen.provider)
    if chosen.event_type:
        query = query.where(_EVENTS.c.event_type == chosen.event_type)
    if chosen.since:
        query = query.where(_EVENTS.c.received_at >= chosen.since)
    if chosen.until:
        query = query.where(_EVENTS.c.received_at < chosen.until)
    return list(session.scalars(query))


def reopen_many(session: Session, event_ids: Sequence[int]) -> dict[int, str | None]:
    """reopen for many events at once; returns those reopened, {id: trace
    id} by id. An event
    settled otherwise meanwhile (processed) is left out, never reopened. The
    rows are locked in id order, as the worker's batches lock them."""
    locked = (
        select(_EVENTS.c.id)
        .where(_EVENTS.c.id.in_(list(event_ids)), _EVENTS.c.status.in_(REPLAYABLE))
        .order_by(_EVENTS.c.id)
        .with_for_update()
        .scalar_subquery()
    )
    reopened = session.execute(
        update(_EVENTS)
        .where(_EVENTS.c.id.in_(locked))
        .values(status="received", processed_at=None, published_at=None)
        .returning(_EVENTS.c.id, _EVENTS.c.trace_id)
    )
    return dict(sorted(((row.id, row.trace_id) for row in reopened), key=lambda pair: pair[0]))
