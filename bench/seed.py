"""Bulk seeding with raw SQL (COPY), mirroring the rows checkout and the
webhook write: products with their `reserved` units and a restock movement,
pending orders with lines, a pending Stripe payment, an active reservation
per line and the checkout transition; optionally the stored
`payment_intent.succeeded` event of each payment."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench import events

PRICE = 1500
CURRENCY = "EUR"


@dataclass(frozen=True)
class SeededOrder:
    order_id: uuid.UUID
    payment_id: uuid.UUID
    intent_id: str
    amount: int
    lines: tuple[tuple[str, int], ...]


def products(conn: psycopg.Connection[tuple[Any, ...]], skus: Sequence[str], on_hand: int) -> None:
    with conn.transaction():
        for sku in skus:
            conn.execute(
                "INSERT INTO products (sku, name, price, currency, on_hand, reserved, low_stock_threshold)"
                " VALUES (%s, %s, %s, %s, %s, 0, 0)",
                (sku, f"Bench {sku}", PRICE, CURRENCY, on_hand),
            )
            conn.execute(
                "INSERT INTO stock_movements (sku, type, quantity, on_hand_before, on_hand_after, reason)"
                " VALUES (%s, 'restock', %s, 0, %s, 'bench seed')",
                (sku, on_hand, on_hand),
            )


def plan_orders(count: int, skus: Sequence[str], quantity: int = 1) -> list[SeededOrder]:
    """`count` one-line orders spread round-robin over `skus`."""
    orders = []
    for i in range(count):
        sku = skus[i % len(skus)]
        orders.append(
            SeededOrder(
                uuid.uuid4(),
                uuid.uuid4(),
                f"pi_bench_{uuid.uuid4().hex[:24]}",
                PRICE * quantity,
                ((sku, quantity),),
            )
        )
    return orders


def pending_orders(
    conn: psycopg.Connection[tuple[Any, ...]],
    orders: Sequence[SeededOrder],
    *,
    expires_in: timedelta,
    created_ago: timedelta = timedelta(minutes=1),
    spacing: timedelta = timedelta(0),
) -> list[datetime]:
    """Orders as a committed checkout leaves them (PaymentIntent id attached),
    the i-th created and expiring `i * spacing` after the first. Returns each
    order's creation time."""
    now = datetime.now(UTC)
    created_at = [now - created_ago + i * spacing for i in range(len(orders))]
    expires_at = [now + expires_in + i * spacing for i in range(len(orders))]
    reserved: Counter[str] = Counter()
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(
            "COPY orders (id, status, currency, total_amount, customer_email, expires_at, created_at,"
            " updated_at) FROM STDIN"
        ) as copy:
            for o, created, expires in zip(orders, created_at, expires_at, strict=True):
                copy.write_row(
                    (
                        o.order_id,
                        "pending_payment",
                        CURRENCY,
                        o.amount,
                        "bench@example.com",
                        expires,
                        created,
                        created,
                    )
                )
        with cur.copy("COPY order_lines (order_id, sku, quantity, unit_price) FROM STDIN") as copy:
            for o in orders:
                for sku, quantity in o.lines:
                    copy.write_row((o.order_id, sku, quantity, PRICE))
        with cur.copy(
            "COPY payments (id, order_id, provider, provider_payment_id, status, amount, currency,"
            " created_at, updated_at) FROM STDIN"
        ) as copy:
            for o, created in zip(orders, created_at, strict=True):
                copy.write_row(
                    (
                        o.payment_id,
                        o.order_id,
                        "stripe",
                        o.intent_id,
                        "pending",
                        o.amount,
                        CURRENCY,
                        created,
                        created,
                    )
                )
        with cur.copy(
            "COPY stock_reservations (order_id, sku, quantity, status, created_at) FROM STDIN"
        ) as copy:
            for o, created in zip(orders, created_at, strict=True):
                for sku, quantity in o.lines:
                    copy.write_row((o.order_id, sku, quantity, "active", created))
                    reserved[sku] += quantity
        with cur.copy(
            "COPY order_transitions (order_id, subject, from_status, to_status, reason, created_at)"
            " FROM STDIN"
        ) as copy:
            for o, created in zip(orders, created_at, strict=True):
                copy.write_row((o.order_id, "order", None, "pending_payment", "checkout", created))
        for sku, units in sorted(reserved.items()):
            cur.execute("UPDATE products SET reserved = reserved + %s WHERE sku = %s", (units, sku))
    analyze(conn)
    return created_at


def succeeded_events(
    conn: psycopg.Connection[tuple[Any, ...]],
    orders: Sequence[SeededOrder],
    *,
    published: bool,
    received_ago: timedelta = timedelta(seconds=30),
) -> list[int]:
    """The stored `payment_intent.succeeded` event of each order (as the
    ingress stores it); returns the event row ids in order."""
    received = datetime.now(UTC) - received_ago
    published_at = datetime.now(UTC) if published else None
    keys = []
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(
            "COPY provider_events (provider, event_key, event_type, provider_payment_id, payload, status,"
            " attempts, received_at, published_at) FROM STDIN"
        ) as copy:
            for o in orders:
                metadata = {"order_id": str(o.order_id), "payment_id": str(o.payment_id)}
                event = events.intent_event(o.intent_id, o.amount, metadata)
                keys.append(event["id"])
                copy.write_row(
                    (
                        "stripe",
                        event["id"],
                        event["type"],
                        o.intent_id,
                        json.dumps(event),
                        "received",
                        0,
                        received,
                        published_at,
                    )
                )
        cur.execute(
            "SELECT event_key, id FROM provider_events WHERE provider = 'stripe' AND event_key = ANY(%s)",
            (keys,),
        )
        ids: dict[str, int] = {str(key): int(row_id) for key, row_id in cur.fetchall()}
    analyze(conn)
    return [ids[key] for key in keys]


def analyze(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    """Statistics for what was just loaded, as any bulk load ends (and as
    autovacuum would within a minute): without them the planner takes
    thousands of freshly copied rows for a handful and picks scans that no
    database in service would."""
    conn.execute("ANALYZE")
    conn.commit()
