"""Engine, sessions and migrations: the storage wiring every process shares."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


# TCP keepalives on both ends. The client's (libpq) notice a dead server or
# network instead of hanging; the server's (the tcp_keepalives_* settings,
# passed as options) notice a worker whose host vanished, so its session
# ends and the job's advisory lock it held is freed within about a minute.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
SERVER_KEEPALIVES = "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"


def make_engine(database_url: str, *, pool_size: int = 5, max_overflow: int = 10) -> Engine:
    # pool_pre_ping: a connection PostgreSQL dropped while idle is replaced
    # instead of failing the next request. A process with many threads needs
    # a pool as large as the threads that use it at once: a connection made
    # beyond pool_size is closed when returned, and the next one pays a
    # new PostgreSQL backend (several ms) on the request path.
    connect_args: dict[str, object] = dict(KEEPALIVES)
    if "options" not in make_url(database_url).query:  # options given in DATABASE_URL win
        connect_args["options"] = SERVER_KEEPALIVES
    return create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    # Objects stay readable after commit: adapters answer from them.
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)
