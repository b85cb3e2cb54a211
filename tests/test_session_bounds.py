"""Every pooled session is bounded (promise 9 of DESIGN.md): it waits for a
row lock, runs a statement and sits idle in a transaction only so long, so
no session whose client hangs or vanished can hold row locks while the
fleet queues behind them. Migrations are not cut by those bounds. A failed
statement's error does not carry its parameters (promise 8)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from payfleet.platform.db import SessionTimeouts, make_engine, migrate
from tests.conftest import PG_ADMIN_URL, PG_HOST_PART

SKU = "BOUND-1"


def bounded(database_url: str, **timeouts: float) -> Engine:
    return make_engine(database_url, pool_size=2, max_overflow=0, timeouts=SessionTimeouts(**timeouts))


@pytest.fixture
def product_row(database_url: str) -> str:
    with psycopg.connect(database_url.replace("+psycopg", "")) as conn:
        conn.execute(
            "INSERT INTO products (sku, name, price, currency, on_hand, reserved, low_stock_threshold)"
            " VALUES (%s, 'bound', 100, 'EUR', 5, 0, 0)",
            (SKU,),
        )
    return SKU


@pytest.fixture
def holder(database_url: str) -> Iterator[psycopg.Connection]:
    """A second session, outside the engine, that takes row locks and keeps them."""
    with psycopg.connect(database_url.replace("+psycopg", "")) as conn:
        yield conn


def lock_product(conn: psycopg.Connection, sku: str) -> None:
    conn.execute("SELECT 1 FROM products WHERE sku = %s FOR UPDATE", (sku,))


def test_every_pooled_connection_carries_the_configured_timeouts(database_url):
    engine = bounded(database_url, lock_seconds=1.5, statement_seconds=7, idle_in_transaction_seconds=9)
    try:
        for _ in range(3):  # new and reused pool connections alike
            with engine.connect() as connection:
                shown = [
                    connection.execute(text(f"SHOW {name}")).scalar()
                    for name in ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")
                ]
                assert shown == ["1500ms", "7s", "9s"]
    finally:
        engine.dispose()


def test_options_given_in_database_url_win_over_the_defaults(database_url):
    engine = bounded(f"{database_url}?options=-c%20lock_timeout%3D250", lock_seconds=5)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW lock_timeout")).scalar() == "250ms"
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "30s"
            assert connection.execute(text("SHOW tcp_keepalives_idle")).scalar() == "30"
    finally:
        engine.dispose()


def test_a_lock_wait_longer_than_the_lock_timeout_fails_with_lock_not_available(
    database_url, product_row, holder
):
    lock_product(holder, product_row)
    engine = bounded(database_url, lock_seconds=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(OperationalError) as raised, engine.begin() as connection:
            connection.execute(text("SET LOCAL statement_timeout = '5s'"))  # a backstop, not the bound tested
            connection.execute(text("SELECT 1 FROM products WHERE sku = :s FOR UPDATE"), {"s": product_row})
    finally:
        engine.dispose()
    assert isinstance(raised.value.orig, psycopg.errors.LockNotAvailable)
    assert raised.value.orig.sqlstate == "55P03"
    assert time.monotonic() - started < 3


def test_a_statement_longer_than_the_statement_timeout_is_cancelled(database_url):
    engine = bounded(database_url, statement_seconds=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(OperationalError) as raised, engine.connect() as connection:
            connection.execute(text("SELECT pg_sleep(5)"))
    finally:
        engine.dispose()
    assert isinstance(raised.value.orig, psycopg.errors.QueryCanceled)
    assert time.monotonic() - started < 3


def test_a_session_left_idle_in_a_transaction_is_ended_and_its_locks_freed(database_url, product_row, holder):
    engine = bounded(database_url, idle_in_transaction_seconds=0.5)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1 FROM products WHERE sku = :s FOR UPDATE"), {"s": product_row})
            # Its client now does nothing, holding the row: PostgreSQL ends the session.
            started = time.monotonic()
            holder.execute("SET lock_timeout = '10s'")
            lock_product(holder, product_row)  # waits until the idle session is gone
            assert 0.3 < time.monotonic() - started < 5
            with pytest.raises(DBAPIError):
                connection.execute(text("SELECT 1"))
        # The pool hands out a working connection afterwards.
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


def test_a_failed_statements_error_does_not_carry_its_parameters(database_url):
    engine = bounded(database_url)
    secret = "ada.secret@example.com +33611223344"
    try:
        with pytest.raises(DBAPIError) as raised, engine.connect() as connection:
            connection.execute(text("CREATE TEMPORARY TABLE contact (email varchar(8))"))
            # Too long for the column: PostgreSQL's own message names no value.
            connection.execute(text("INSERT INTO contact (email) VALUES (:email)"), {"email": secret})
    finally:
        engine.dispose()
    assert isinstance(raised.value.orig, psycopg.errors.StringDataRightTruncation)
    assert "ada.secret" not in str(raised.value)
    assert "hide_parameters" in str(raised.value)


def test_migrations_are_not_cut_by_a_statement_timeout_the_database_sets(run_id):
    name = f"{run_id}_migrate_bound"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
        # What an operator sets to bound every session: migrations must still run.
        admin.execute(f"ALTER DATABASE \"{name}\" SET statement_timeout = '1ms'")
    try:
        url = f"{PG_HOST_PART}/{name}"
        migrate(url)
        with psycopg.connect(url.replace("+psycopg", ""), options="-c statement_timeout=0") as conn:
            assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
