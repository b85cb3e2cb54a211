"""Many rows in one statement: the values go as one array per column and
the server unnests them. One fixed statement whatever the row count, where
an executemany (or a multi-row VALUES, a new statement for every count)
costs a statement's client and server work per row. The same for a WHERE
over many keys: `any_of` is one array parameter, where an expanding IN
renders a new statement for every count of keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, Table, any_, bindparam, text
from sqlalchemy.dialects import postgresql

_POSTGRESQL = postgresql.dialect()  # type: ignore[no-untyped-call]


class BulkInsert:
    """INSERT INTO table (columns) SELECT * FROM unnest(arrays)."""

    def __init__(self, table: Table, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        arrays = ", ".join(
            f"CAST(:{name} AS {table.c[name].type.compile(dialect=_POSTGRESQL)}[])" for name in self.columns
        )
        self.statement = text(
            f"INSERT INTO {table.name} ({', '.join(self.columns)}) SELECT * FROM unnest({arrays})"
        )

    def run(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            connection.execute(self.statement, {name: [row[name] for row in rows] for name in self.columns})


def any_of(column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    """`column = ANY(:name)`, the keys bound as one array of the column's type.
    Its SQL is the same for 1 key or 64, so SQLAlchemy binds it without
    rendering it again and psycopg prepares it once per connection."""
    return column == any_(bindparam(name, type_=postgresql.ARRAY(column.type)))
