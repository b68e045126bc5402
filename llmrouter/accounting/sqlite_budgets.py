"""The ``database`` budget store's statements on SQLite, with the standard library's
``sqlite3`` in a worker thread.

Through SQLAlchemy's async engine on aiosqlite every statement is a hand-off to
aiosqlite's thread and back, with SQLAlchemy's execution in greenlets around it: a
reservation (the counter's ``UPDATE`` and its lease) and its settling (the lease's
``DELETE`` and the ``UPDATE``) cost a budgeted request ~3 ms of the event loop's CPU.
Here each is one function run in one transaction, in one trip to a worker thread, on a
connection of the store's own (~0.3 ms for both), set up like the engine's
(:func:`~llmrouter.accounting.db.set_sqlite_pragmas`: WAL, a 10 s busy timeout).
Transactions begin ``IMMEDIATE``: the write lock is taken first, so a writer in another
process makes it wait (the busy timeout) rather than fail when it would turn a read into
a write. SQLite has one writer at a time, so the conditional ``UPDATE`` cannot let two
requests through, in this process or another.

The functions take a DB-API cursor, so that a database in memory (which a second
connection would not see) runs them on the engine's connection instead
(:meth:`DatabaseBudgetStore <llmrouter.accounting.budget_stores.DatabaseBudgetStore>`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from llmrouter.accounting.models import BudgetCounterRow, BudgetReservationRow
from llmrouter.accounting.sqlite_thread import SQLiteThread

__all__ = ["SQLiteRunner", "forget_ended", "read", "settle", "sweep", "take"]

T = TypeVar("T")

_COUNTERS = BudgetCounterRow.__tablename__
_LEASES = BudgetReservationRow.__tablename__

_TAKE = (
    f"UPDATE {_COUNTERS} SET reserved_nanos = reserved_nanos + ? WHERE counter = ? "
    "AND spent_nanos + reserved_nanos + ? <= ? RETURNING spent_nanos, reserved_nanos"
)
_LEASE = (
    f"INSERT INTO {_LEASES} (counter, request_id, amount_nanos, expires_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (counter, request_id) DO UPDATE SET amount_nanos = amount_nanos + excluded.amount_nanos, "
    "expires_at = excluded.expires_at"
)
_UNSPENT = f"SELECT spent_nanos, reserved_nanos FROM {_COUNTERS} WHERE counter = ? AND spent_nanos + reserved_nanos < ?"
_FREE = f"DELETE FROM {_LEASES} WHERE counter = ? AND request_id = ? RETURNING amount_nanos"
_SETTLE = (
    f"UPDATE {_COUNTERS} SET reserved_nanos = reserved_nanos - ?, spent_nanos = spent_nanos + ? "
    "WHERE counter = ? RETURNING spent_nanos"
)
_EXPIRED = f"DELETE FROM {_LEASES} WHERE counter = ? AND expires_at < ? RETURNING amount_nanos"
_GIVE_BACK = f"UPDATE {_COUNTERS} SET reserved_nanos = reserved_nanos - ? WHERE counter = ?"
_READ = f"SELECT spent_nanos, reserved_nanos FROM {_COUNTERS} WHERE counter = ?"
_ENDED_LEASES = f"DELETE FROM {_LEASES} WHERE counter IN (SELECT counter FROM {_COUNTERS} WHERE ends_at < ?)"
_ENDED = f"DELETE FROM {_COUNTERS} WHERE ends_at < ?"


def take(cursor: Any, counter: str, amount: int, limit: int, request_id: str, deadline: float) -> Any:
    """Reserve ``amount`` under ``limit`` with a lease until ``deadline``: the counter's
    (spent, reserved) after it, or None when the window cannot take it. Reserving
    nothing only needs the window not spent, and holds no lease."""
    if not amount:
        return _one(cursor, _UNSPENT, (counter, limit))
    row = _one(cursor, _TAKE, (amount, counter, amount, limit))
    if row is not None:
        cursor.execute(_LEASE, (counter, request_id, amount, deadline))
    return row


def settle(cursor: Any, counter: str, request_id: str, actual: int, only_held: bool = False) -> Any:
    """Add ``actual`` to spent and give back what the request's lease holds (nothing
    when a sweep freed it first); the new spent, or None without the counter. With
    ``only_held``, a settlement whose lease is gone (settled before) changes nothing."""
    lease = _one(cursor, _FREE, (counter, request_id))
    if lease is None and only_held:
        row = read(cursor, counter)
        return None if row is None else row[0]
    row = _one(cursor, _SETTLE, (lease[0] if lease else 0, actual, counter))
    return None if row is None else row[0]


def sweep(cursor: Any, counter: str, now: float) -> int:
    """Free the counter's leases that expired before ``now``; what they held."""
    cursor.execute(_EXPIRED, (counter, now))
    freed = sum(row[0] for row in cursor.fetchall())
    if freed:
        cursor.execute(_GIVE_BACK, (freed, counter))
    return freed


def forget_ended(cursor: Any, before: float) -> None:
    """Delete the counters of windows that ended before ``before``, and their leases."""
    cursor.execute(_ENDED_LEASES, (before,))
    cursor.execute(_ENDED, (before,))


def read(cursor: Any, counter: str) -> Any:
    """The counter's (spent, reserved), or None."""
    return _one(cursor, _READ, (counter,))


def _one(cursor: Any, sql: str, parameters: tuple[Any, ...]) -> Any:
    # execute() returns the cursor in sqlite3, not in every DB-API driver (aiosqlite's adapter)
    cursor.execute(sql, parameters)
    return cursor.fetchone()


class SQLiteRunner:
    """Runs those functions on a SQLite file, each in a transaction of its own, one at a
    time, in a worker thread.

    Args:
        path: the database file (the tables exist: ``llmrouter db upgrade`` made them).
    """

    def __init__(self, path: str) -> None:
        self._db = SQLiteThread(path, autocommit=True)  # the transactions are the ones begun here

    async def __call__(self, work: Callable[..., T], *args: Any) -> T:
        return await self._db.run(_in_transaction, work, args)

    def close(self) -> None:
        self._db.close()


def _in_transaction(connection: sqlite3.Connection, work: Callable[..., T], args: tuple[Any, ...]) -> T:
    cursor = connection.cursor()
    try:
        cursor.execute("BEGIN IMMEDIATE")
        result = work(cursor, *args)
    except BaseException:
        connection.rollback()
        raise
    finally:
        cursor.close()
    connection.commit()
    return result
