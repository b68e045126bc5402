"""Ledger inserts into a SQLite file with the standard library's ``sqlite3``, in a worker thread.

Through SQLAlchemy's async engine on aiosqlite, a batch insert runs SQLAlchemy's
statement execution in greenlets on the event loop's thread and hands every DBAPI
call to aiosqlite's thread and back: measured in the gateway at concurrency 1, that
cost ~0.3 ms of the event loop's CPU per ledger row, as much as routing the request.
Here prepared ``INSERT`` statements run with ``executemany`` off the loop, on a single
connection used by one thread at a time and set up like the engine's
(:func:`~llmrouter.accounting.db.set_sqlite_pragmas`: WAL, a 10 s busy timeout). Each
statement inserts :data:`ROWS_PER_STATEMENT` rows (a batch's last few, one each): per
row, sqlite3 resets and steps a statement and checks its parameters, and ~40 rows a
statement cut what a row costs from ~39k CPU instructions to ~31k. The statements are
the engine's too: ``ON CONFLICT (entry_id) DO NOTHING``, so replays and retried batches
never bill twice.

PostgreSQL, and SQLite in memory (a second connection would see another database),
keep :func:`~llmrouter.accounting.ledger.insert_rows`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from itertools import chain
from typing import Any, cast

from llmrouter.accounting.sqlite_thread import SQLiteThread

__all__ = ["ROWS_PER_STATEMENT", "SQLiteInserter", "is_refused"]

ROWS_PER_STATEMENT = 40
"""Rows one ``INSERT`` takes (fewer where SQLite allows fewer parameters: 999 before 3.32)."""

# sqlite3 binds int, float, str and bytes as they are; any other value (None and bool, in
# every ledger row) first goes through its adapter protocol, which looks up and fails to
# find ``__adapt__`` and ``__conform__``, raising and clearing an AttributeError each time:
# ~3k CPU instructions per value, a sixth of what inserting a row costs. Registered
# adapters are found first. Both bind exactly what sqlite3 binds without them (NULL; 0
# or 1), and registering them does not slow other values (only adapters for int, float,
# str or bytearray do).
sqlite3.register_adapter(bool, int)
sqlite3.register_adapter(type(None), cast(Any, {}.get))  # a C function: None for None


def is_refused(exc: BaseException) -> bool:
    """The rows themselves were refused (a constraint, a value sqlite3 cannot bind)."""
    return isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, OverflowError))


class SQLiteInserter:
    """An async callable that inserts ledger rows, given as tuples of values, into ``path``.

    Args:
        path: the database file (the tables exist: ``llmrouter db upgrade`` made them).
        table: the ledger table's name.
        columns: the columns of every row, in the order of its values.
    """

    def __init__(self, path: str, table: str, columns: Sequence[str]) -> None:
        self._table = table
        self._columns = tuple(columns)
        self._sql = self._statement(1)
        self._rows_per_statement = 1  # and the statement for them: set when it connects
        self._many_sql = self._sql
        self._db = SQLiteThread(path, on_connect=self._fit_statements)

    async def __call__(self, values: list[tuple[Any, ...]]) -> None:
        await self._db.run(self._insert, values)

    def _insert(self, connection: sqlite3.Connection, values: list[tuple[Any, ...]]) -> None:
        per = self._rows_per_statement
        grouped = len(values) - len(values) % per
        with connection:  # one transaction: committed, or rolled back on any error
            if grouped:
                connection.executemany(
                    self._many_sql,
                    [tuple(chain.from_iterable(values[i : i + per])) for i in range(0, grouped, per)],
                )
            if grouped < len(values):
                connection.executemany(self._sql, values[grouped:])

    def _statement(self, rows: int) -> str:
        placeholders = f"({', '.join('?' * len(self._columns))})"
        return (
            f"INSERT INTO {self._table} ({', '.join(self._columns)}) VALUES "
            f"{', '.join([placeholders] * rows)} ON CONFLICT (entry_id) DO NOTHING"
        )

    def _fit_statements(self, connection: sqlite3.Connection) -> None:
        most = connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(self._columns)
        self._rows_per_statement = max(1, min(ROWS_PER_STATEMENT, most))
        self._many_sql = self._statement(self._rows_per_statement)

    def close(self) -> None:
        self._db.close()
