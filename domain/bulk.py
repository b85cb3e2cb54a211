"""Many rows in one statement: the values go as one array per column and
the server unnests them. One fixed statement whatever the row count, where
an executemany (or a multi-row VALUES, a new statement for every count)
costs a statement's client and server work per row. The same for a WHERE
over many keys: `any_of` is one array parameter, where an expanding IN
renders a new statement for every count of keys. And several such writes
that read nothing back go as one statement too (`write_together`): one round
trip for all of them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, Connection, Table, TextClause, any_, bindparam, text
from sqlalchemy.dialects import postgresql

_POSTGRESQL = postgresql.dialect()  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Write:
    """A statement that reads nothing back, with its parameters. Its
    parameter names are its own (see write_together)."""

    sql: str
    params: Mapping[str, Any]


def write_together(connection: Connection, writes: Sequence[Write]) -> None:
    """The writes as one statement, `WITH w0 AS (…), w1 AS (…) SELECT 1`
    (PostgreSQL runs every data-modifying WITH to completion, read or not):
    one round trip instead of one each, which under load is most of what a
    small write costs. They share the statement's one snapshot, so none may
    change a row another changes or read what another writes."""
    if not writes:
        return
    params: dict[str, Any] = {}
    for write in writes:
        assert not params.keys() & write.params.keys(), "writes sent together name their parameters apart"
        params.update(write.params)
    connection.execute(_together(tuple(write.sql for write in writes)), params)


@lru_cache(maxsize=64)
def _together(statements: tuple[str, ...]) -> TextClause:
    if len(statements) == 1:
        return text(statements[0])
    return text("WITH " + ", ".join(f"w{i} AS ({sql})" for i, sql in enumerate(statements)) + " SELECT 1")


class BulkInsert:
    """INSERT INTO table (columns) SELECT * FROM unnest(arrays); each
    column's array is bound as `<table>_<column>`."""

    def __init__(self, table: Table, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        self._names = {name: f"{table.name}_{name}" for name in self.columns}
        arrays = ", ".join(
            f"CAST(:{self._names[name]} AS {table.c[name].type.compile(dialect=_POSTGRESQL)}[])"
            for name in self.columns
        )
        self.sql = f"INSERT INTO {table.name} ({', '.join(self.columns)}) SELECT * FROM unnest({arrays})"

    def write(self, rows: Sequence[Mapping[str, Any]]) -> Write:
        return Write(self.sql, {self._names[name]: [row[name] for row in rows] for name in self.columns})


def any_of(column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    """`column = ANY(:name)`, the keys bound as one array of the column's type.
    Its SQL is the same for 1 key or 64, so SQLAlchemy binds it without
    rendering it again and psycopg prepares it once per connection."""
    return column == any_(bindparam(name, type_=postgresql.ARRAY(column.type)))
