"""Many rows in one statement: the values go as one array per column and
the server unnests them. One fixed statement whatever the row count, where
an executemany (or a multi-row VALUES, a new statement for every count)
costs a statement's client and server work per row."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table, text
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
