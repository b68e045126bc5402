"""WAL mode for a SQLite file that several processes may open at the same moment.

The ledger, the accounting engine and the SQLite cache all keep their file in WAL mode.
Switching a file to WAL takes an exclusive lock, and when another process holds a lock
that waiting on could deadlock (two workers opening a new file together), SQLite answers
``database is locked`` at once, whatever the busy timeout. :func:`enable_wal` sets the
busy timeout first and retries the switch.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

__all__ = ["enable_wal"]

_WAL_RETRY_SECONDS = 10.0
_WAL_RETRY_PAUSE = 0.05


def enable_wal(connection: Any, *, busy_timeout_ms: int) -> None:
    """Give ``connection`` (a DB-API connection to a SQLite file) a busy timeout, then put
    its file in WAL mode, retrying for up to 10 s while another process holds it.

    Raises:
        sqlite3.OperationalError: the file stayed locked, or another failure.
    """
    cursor = connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        deadline = time.monotonic() + _WAL_RETRY_SECONDS
        while True:
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                busy = getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() >= deadline:
                    raise
                time.sleep(_WAL_RETRY_PAUSE)
    finally:
        cursor.close()
