"""A SQLite file's own connection, used from a worker thread, one call at a time.

The ledger's inserts and the ``database`` budget store's statements run on the standard
library's ``sqlite3`` off the event loop rather than through SQLAlchemy on aiosqlite,
which hands every statement to aiosqlite's thread and back with SQLAlchemy's execution
in greenlets around it (see :mod:`llmrouter.accounting.sqlite_ledger` and
:mod:`llmrouter.accounting.sqlite_budgets` for what that cost). The connection is set
up like the engine's (:func:`~llmrouter.accounting.db.set_sqlite_pragmas`: WAL, a 10 s
busy timeout) and opened on first use.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from llmrouter.accounting.db import set_sqlite_pragmas

__all__ = ["SQLiteThread"]

T = TypeVar("T")


class SQLiteThread:
    """``await run(work, *args)`` calls ``work(connection, *args)`` in a worker thread.

    Args:
        path: the database file (the tables exist: ``llmrouter db upgrade`` made them).
        autocommit: open the connection in autocommit mode (``work`` begins and ends its
            own transactions) rather than sqlite3's implicit ones.
        on_connect: called with the new connection, after the pragmas.
    """

    def __init__(
        self,
        path: str,
        *,
        autocommit: bool = False,
        on_connect: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        self._path = path
        self._autocommit = autocommit
        self._on_connect = on_connect
        self._connection: sqlite3.Connection | None = None
        self._limiter: anyio.CapacityLimiter | None = None

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)  # one connection: one thread at a time
        return await anyio.to_thread.run_sync(self._call, work, args, limiter=self._limiter)

    def _call(self, work: Callable[..., T], args: tuple[Any, ...]) -> T:
        return work(self._connection or self._connect(), *args)

    def _connect(self) -> sqlite3.Connection:
        isolation: Any = None if self._autocommit else ""
        connection = sqlite3.connect(self._path, check_same_thread=False, isolation_level=isolation)
        set_sqlite_pragmas(connection)
        if self._on_connect is not None:
            self._on_connect(connection)
        self._connection = connection
        return connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
