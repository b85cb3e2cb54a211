"""A probe for promise 9 (no row lock waits on the network): a connection
that keeps taking given rows' locks while a job runs, and reports each time
it had to give up waiting."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

# Each provider answer takes SLOW seconds; the probe waits at most PATIENCE
# for a lock: far longer than a short settle transaction takes (even on a
# busy machine), shorter than any provider call.
SLOW = 1.0
PATIENCE = "600ms"


@contextmanager
def lock_probe(database_url: str, order_ids: list[str], sku: str | None = None) -> Iterator[list[str]]:
    """All the while, lock the orders' payments, the orders and (given) the
    product's row, waiting at most PATIENCE for each; yields the refusals (a
    lock held across a provider call shows up here)."""
    refused: list[str] = []
    done = threading.Event()

    def probe() -> None:
        with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"SET lock_timeout = '{PATIENCE}'")
            while not done.is_set():
                try:
                    with conn.transaction():
                        _lock_rows(conn, order_ids, sku)
                except psycopg.errors.LockNotAvailable as error:
                    refused.append(str(error))
                time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        yield refused
    finally:
        done.set()
        prober.join(timeout=10)


def _lock_rows(conn: psycopg.Connection[tuple[object, ...]], order_ids: list[str], sku: str | None) -> None:
    # Payments, then orders, then products: the order every writer locks them in.
    conn.execute("SELECT 1 FROM payments WHERE order_id = ANY(%s::uuid[]) FOR UPDATE", (order_ids,))
    conn.execute("SELECT 1 FROM orders WHERE id = ANY(%s::uuid[]) FOR UPDATE", (order_ids,))
    if sku is not None:
        conn.execute("SELECT 1 FROM products WHERE sku = %s FOR UPDATE", (sku,))
