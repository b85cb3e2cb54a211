"""The tables. The database holds the invariants: the CHECKs and unique keys
here are what make a replayed event, a racing checkout or a bad UPDATE fail
instead of corrupting stock or money."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ORDER_STATUSES = (
    "pending_payment",
    "paid",
    "ready_for_pickup",
    "completed",
    "expired",
    "failed",
    "canceled",
    "refunded",
    "needs_attention",
)
PAYMENT_STATUSES = ("pending", "processing", "succeeded", "failed", "canceled", "refunded")
PROVIDERS = ("stripe", "monetbil")
EVENT_STATUSES = ("received", "processed", "ignored", "unmatched", "failed")
RESERVATION_STATUSES = ("active", "released", "consumed")
MOVEMENT_TYPES = ("sale", "restock", "return", "adjustment")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "pk": "pk_%(table_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "ix": "ix_%(table_name)s_%(column_0_name)s",
        }
    )


def _now() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now())


class Product(Base):
    """One stock-keeping unit (a product in one size is its own SKU)."""

    __tablename__ = "products"
    __table_args__ = (
        CheckConstraint("reserved >= 0 AND reserved <= on_hand", name="stock_bounds"),
        CheckConstraint("price >= 0", name="price_not_negative"),
        CheckConstraint("low_stock_threshold >= 0", name="threshold_not_negative"),
    )

    sku: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    price: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    on_hand: Mapped[int] = mapped_column(Integer, default=0)
    reserved: Mapped[int] = mapped_column(Integer, default=0)
    low_stock_threshold: Mapped[int] = mapped_column(Integer, default=0)
    # Set when available stock crosses the threshold downward, cleared when it
    # rises above again: a crossing is logged once, not once per sale.
    low_stock_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (
        CheckConstraint(_one_of("status", ORDER_STATUSES), name="status"),
        CheckConstraint("total_amount >= 0", name="total_not_negative"),
        Index("ix_orders_status_expires_at", "status", "expires_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    status: Mapped[str] = mapped_column(String(32), default="pending_payment")
    currency: Mapped[str] = mapped_column(String(3))
    total_amount: Mapped[int] = mapped_column(BigInteger)
    customer_email: Mapped[str | None] = mapped_column(Text)
    customer_phone: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ready_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    lines: Mapped[list[OrderLine]] = relationship(order_by="OrderLine.sku", lazy="selectin")


class OrderLine(Base):
    __tablename__ = "order_lines"
    __table_args__ = (
        UniqueConstraint("order_id", "sku"),
        CheckConstraint("quantity > 0", name="quantity_positive"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    sku: Mapped[str] = mapped_column(ForeignKey("products.sku"))
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price: Mapped[int] = mapped_column(BigInteger)


class Payment(Base):
    __tablename__ = "payments"
    __table_args__ = (
        UniqueConstraint("provider", "provider_payment_id"),
        CheckConstraint(_one_of("status", PAYMENT_STATUSES), name="status"),
        CheckConstraint(_one_of("provider", PROVIDERS), name="provider"),
        CheckConstraint("amount >= 0", name="amount_not_negative"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id"), unique=True)
    provider: Mapped[str] = mapped_column(String(16))
    provider_payment_id: Mapped[str | None] = mapped_column(String(255))
    # A second provider identifier (Monetbil's transaction_uuid).
    provider_reference: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class StockReservation(Base):
    """Units held for an unpaid order. Leaves `active` once, by a conditional
    UPDATE, to `released` (units back) or `consumed` (units sold)."""

    __tablename__ = "stock_reservations"
    __table_args__ = (
        CheckConstraint(_one_of("status", RESERVATION_STATUSES), name="status"),
        CheckConstraint("quantity > 0", name="quantity_positive"),
        CheckConstraint("(status = 'active') = (closed_at IS NULL)", name="closed_once"),
        UniqueConstraint("order_id", "sku"),
        Index("ix_stock_reservations_active", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    sku: Mapped[str] = mapped_column(ForeignKey("products.sku"))
    quantity: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = _now()
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StockMovement(Base):
    """The ledger: every change of `on_hand`, written in the same transaction."""

    __tablename__ = "stock_movements"
    __table_args__ = (
        CheckConstraint(_one_of("type", MOVEMENT_TYPES), name="type"),
        CheckConstraint("quantity <> 0", name="quantity_not_zero"),
        CheckConstraint("on_hand_after = on_hand_before + quantity", name="arithmetic"),
        CheckConstraint("on_hand_after >= 0", name="never_negative"),
        Index("ix_stock_movements_sku_id", "sku", "id"),
        Index("ix_stock_movements_reference", "reference"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    sku: Mapped[str] = mapped_column(ForeignKey("products.sku"))
    type: Mapped[str] = mapped_column(String(16))
    quantity: Mapped[int] = mapped_column(Integer)
    on_hand_before: Mapped[int] = mapped_column(Integer)
    on_hand_after: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text, default="")
    reference: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = _now()


class OrderTransition(Base):
    """The order's and its payment's status changes, for the timeline."""

    __tablename__ = "order_transitions"
    __table_args__ = (
        CheckConstraint("subject IN ('order', 'payment')", name="subject"),
        Index("ix_order_transitions_order_id", "order_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    subject: Mapped[str] = mapped_column(String(16))
    from_status: Mapped[str | None] = mapped_column(String(32))
    to_status: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")
    event_id: Mapped[int | None] = mapped_column(ForeignKey("provider_events.id"))
    created_at: Mapped[datetime] = _now()


class ProviderEvent(Base):
    """A verified provider event, stored before the webhook is answered.

    The row is also the outbox: `published_at` stays NULL until RabbitMQ has
    confirmed the message, and the relay republishes rows left that way."""

    __tablename__ = "provider_events"
    __table_args__ = (
        UniqueConstraint("provider", "event_key"),
        CheckConstraint(_one_of("status", EVENT_STATUSES), name="status"),
        CheckConstraint(_one_of("provider", PROVIDERS), name="provider"),
        CheckConstraint("(status = 'received') = (processed_at IS NULL)", name="processed_mark"),
        Index("ix_provider_events_unpublished", "received_at", postgresql_where="published_at IS NULL"),
        Index("ix_provider_events_status_id", "status", "id"),
        Index("ix_provider_events_provider_payment_id", "provider_payment_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(16))
    event_key: Mapped[str] = mapped_column(String(255))
    event_type: Mapped[str] = mapped_column(String(128))
    provider_payment_id: Mapped[str | None] = mapped_column(String(255))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(16), default="received")
    payment_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("payments.id"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = _now()
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Ties the webhook to every attempt, log line and provider call it causes:
    # the provider's request id where it sends one, else a fresh one.
    trace_id: Mapped[str | None] = mapped_column(String(64))


class Cart(Base):
    """A basket that reserves nothing; it expires a TTL after its last change."""

    __tablename__ = "carts"
    __table_args__ = (
        CheckConstraint("(order_id IS NULL) = (checked_out_at IS NULL)", name="checked_out_once"),
        Index("ix_carts_expires_at", "expires_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    order_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("orders.id"))
    checked_out_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    items: Mapped[list[CartItem]] = relationship(
        order_by="CartItem.sku", lazy="selectin", cascade="all, delete-orphan"
    )


class CartItem(Base):
    __tablename__ = "cart_items"
    __table_args__ = (CheckConstraint("quantity > 0", name="quantity_positive"),)

    cart_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("carts.id", ondelete="CASCADE"), primary_key=True)
    sku: Mapped[str] = mapped_column(ForeignKey("products.sku"), primary_key=True)
    quantity: Mapped[int] = mapped_column(Integer)


RUN_STATES = ("queued", "running", "succeeded", "failed", "skipped")
RUN_TRIGGERS = ("scheduled", "manual")
REVIEW_REQUEST_STATUSES = ("pending", "sending", "sent", "failed", "skipped")


class ScheduledRun(Base):
    """One run of a maintenance job. A scheduled run's `(job, slot)` row is
    its claim: the unique key lets one scheduler replica, and only one,
    record (and so publish) a slot. Manual runs have no slot."""

    __tablename__ = "scheduled_runs"
    __table_args__ = (
        UniqueConstraint("job", "slot"),
        CheckConstraint(_one_of("state", RUN_STATES), name="state"),
        CheckConstraint(_one_of("trigger", RUN_TRIGGERS), name="trigger"),
        CheckConstraint("(trigger = 'scheduled') = (slot IS NOT NULL)", name="slot_when_scheduled"),
        Index("ix_scheduled_runs_job_id", "job", "id"),
        Index(
            "ix_scheduled_runs_unpublished",
            "created_at",
            postgresql_where="state = 'queued' AND published_at IS NULL",
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(String(64))
    slot: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    trigger: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    counts: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = _now()
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[int | None] = mapped_column(BigInteger)
    # The run's own trace id, given when the run is created (slot or manual).
    trace_id: Mapped[str | None] = mapped_column(String(64))


class ReviewRequest(Base):
    """A review asked of an order's customer: the unique `order_id` makes it
    one request per order, ever, whatever runs or redeliveries happen."""

    __tablename__ = "review_requests"
    __table_args__ = (
        CheckConstraint(_one_of("status", REVIEW_REQUEST_STATUSES), name="status"),
        Index("ix_review_requests_status", "status", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"), unique=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("scheduled_runs.id", ondelete="SET NULL"))
    phone: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    provider_message_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = _now()
    # When a delivery claimed it (`sending`) just before calling the API.
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The trace id of the run that recorded the request.
    trace_id: Mapped[str | None] = mapped_column(String(64))


class RoutingRuleSet(Base):
    """One version of the operator's routing rules (issue 11): the newest row
    is in force, the older ones are its history."""

    __tablename__ = "routing_rule_sets"
    __table_args__ = (CheckConstraint("jsonb_typeof(rules) = 'array'", name="rules_array"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    rules: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    changed_at: Mapped[datetime] = _now()


class ProviderCircuit(Base):
    """A provider's recent checkout failures and, once they are too many, the
    time until which every ingress process skips it."""

    __tablename__ = "provider_circuits"

    provider: Mapped[str] = mapped_column(String(16), primary_key=True)
    failures: Mapped[list[datetime]] = mapped_column(
        ARRAY(DateTime(timezone=True)), server_default=text("'{}'")
    )
    open_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = _now()


class ArchivedDeadLetter(Base):
    """A dead letter moved out of `<queue>.XQ` before RabbitMQ's TTL could
    drop it: the message as RabbitMQ held it (body and headers, x-death
    included), so it can be listed and requeued later. The unique message id
    makes archiving twice (a crash between insert and ack) one row."""

    __tablename__ = "dead_letter_archive"
    __table_args__ = (Index("ix_dead_letter_archive_queue_id", "queue", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(255), unique=True)
    queue: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(255))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    headers: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    error: Mapped[str] = mapped_column(Text, default="")
    dead_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    archived_at: Mapped[datetime] = _now()
