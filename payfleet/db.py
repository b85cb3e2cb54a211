"""Engine, sessions and migrations: the storage wiring every process shares."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(database_url: str, *, pool_size: int = 5) -> Engine:
    # pool_pre_ping: a connection PostgreSQL dropped while idle is replaced
    # instead of failing the next request.
    return create_engine(database_url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True)


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
