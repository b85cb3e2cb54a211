"""Engine, sessions and migrations: the storage wiring every process shares."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, exc, make_url
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

    from payfleet.platform.config import Settings

MIGRATIONS = Path(__file__).parent / "migrations"


# TCP keepalives on both ends. The client's (libpq) notice a dead server or
# network instead of hanging; the server's (the tcp_keepalives_* settings,
# passed as options) notice a worker whose host vanished, so its session
# ends and the job's advisory lock it held is freed within about a minute.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
SERVER_KEEPALIVES = "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"


@dataclass(frozen=True)
class SessionTimeouts:
    """How long one session may wait for a row lock, run one statement, and
    sit idle inside a transaction (0: no limit). PostgreSQL enforces them, so
    a session whose client vanished or hangs cannot hold its row locks while
    every worker thread queues behind them."""

    lock_seconds: float = 5.0
    statement_seconds: float = 30.0
    idle_in_transaction_seconds: float = 30.0

    @classmethod
    def of(cls, settings: Settings) -> SessionTimeouts:
        return cls(
            settings.db_lock_timeout_seconds,
            settings.db_statement_timeout_seconds,
            settings.db_idle_in_transaction_timeout_seconds,
        )

    def options(self) -> str:
        """As libpq `options`: set when the session starts, no round trip."""
        limits = {
            "lock_timeout": self.lock_seconds,
            "statement_timeout": self.statement_seconds,
            "idle_in_transaction_session_timeout": self.idle_in_transaction_seconds,
        }
        return " ".join(f"-c {name}={int(seconds * 1000)}" for name, seconds in limits.items())


def make_engine(
    database_url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    timeouts: SessionTimeouts = SessionTimeouts(),
) -> Engine:
    # A process with many threads needs a pool as large as the threads that
    # use it at once: a connection made beyond pool_size is closed when
    # returned, and the next one pays a new PostgreSQL backend (several ms)
    # on the request path.
    connect_args: dict[str, object] = dict(KEEPALIVES)
    connect_args["options"] = _session_options(database_url, timeouts)
    engine = create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        connect_args=connect_args,
        # A failed statement's error (logged, kept as an event's last_error)
        # must not carry its parameters: emails, phones, whole payloads.
        hide_parameters=True,
    )
    _ping_when_idle(engine)
    return engine


def engine_for(settings: Settings, *, pool_size: int = 5, max_overflow: int = 10) -> Engine:
    """A payfleet process's engine: its database, with its session timeouts."""
    return make_engine(
        settings.database_url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        timeouts=SessionTimeouts.of(settings),
    )


def _session_options(database_url: str, timeouts: SessionTimeouts) -> str:
    # connect_args replace the URL's own `options`, so those are kept, last:
    # PostgreSQL takes the last of two settings of one name, and options given
    # in DATABASE_URL win.
    return " ".join(
        part for part in (SERVER_KEEPALIVES, timeouts.options(), _url_options(database_url)) if part
    )


def _url_options(database_url: str) -> str:
    given = make_url(database_url).query.get("options", "")
    return " ".join(given) if isinstance(given, tuple) else given


# A connection back in the pool for less than this was working a moment ago.
IDLE_BEFORE_PING_SECONDS = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """pool_pre_ping, for idle connections only. A connection PostgreSQL
    dropped while it sat in the pool is replaced before use instead of
    failing the request; one in constant use is not pinged, which saves a
    round trip on every transaction. One that dies mid-use fails its
    transaction, and SQLAlchemy then renews the whole pool."""

    @event.listens_for(engine, "connect")
    def made(dbapi_connection: Any, record: Any) -> None:
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine, "checkin")
    def returned(dbapi_connection: Any, record: Any) -> None:
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if time.monotonic() - record.info.get("returned_at", 0.0) < IDLE_BEFORE_PING_SECONDS:
            return
        try:
            dbapi_connection.execute("SELECT 1")
            dbapi_connection.rollback()
        except Exception:
            # The pool discards this connection and checks out another.
            raise exc.DisconnectionError() from None


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    # Objects stay readable after commit: adapters answer from them.
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(database_url: str) -> Config:
    # Imported here, not at the top: alembic is a second of every process's boot.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    url = _without_statement_timeout(database_url)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


# A migration may rewrite a large table for minutes: no statement timeout,
# whatever DATABASE_URL or the database's defaults (ALTER DATABASE/ROLE ...
# SET statement_timeout) ask of the fleet's sessions.
UNBOUNDED_STATEMENTS = "-c statement_timeout=0"


def _without_statement_timeout(database_url: str) -> str:
    url = make_url(database_url)
    options = " ".join(part for part in (_url_options(database_url), UNBOUNDED_STATEMENTS) if part)
    return url.update_query_dict({"options": options}).render_as_string(hide_password=False)


def migrate(database_url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)
