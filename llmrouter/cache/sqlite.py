"""SQLite cache backend (aiosqlite): survives restarts, shareable by the workers of
one machine, and can live in the accounting database's file (its own table).

Entries carry an absolute expiry time (Unix seconds) and a last-access time; past
``max_bytes`` (the table's total, whichever process stored it: see
:meth:`SQLiteBackend.set`) the expired rows go first, then the least recently used ones.

Shared by processes: every statement commits by itself (autocommit), and each runs to
its end in one call to aiosqlite's thread (``execute_fetchall``), so no transaction or
read snapshot outlives it. With sqlite3's default transactions a write began an implicit
transaction that lasted until the next commit, the other requests' statements ran inside
it, and a read whose cursor was still open when a write started left SQLite a stale
snapshot to upgrade, which it refuses at once, busy timeout or not: two worker
processes on one file got ``database is locked`` for over half of one's operations
(70,011 of 110,282 in 5 s, 32 tasks each, 30% stores); now none, and one process does
10,500 operations a second instead of 7,300.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from llmrouter.cache.base import BackendStats
from llmrouter.errors import ConfigError
from llmrouter.sqlite_wal import enable_wal

if TYPE_CHECKING:
    import aiosqlite

__all__ = ["SQLiteBackend"]

log = logging.getLogger("llmrouter.cache")

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_EVICT_BATCH = 64
_RECOUNT_SHARE = 16
"""A process re-reads the table's true total after storing ``max_bytes / 16`` bytes."""
_UNUSABLE_FILE = frozenset(
    {sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_NOTADB}
)
"""Primary result codes that say the file itself cannot serve: a setting to fix, not an outage."""


def _use_wal(path: str) -> None:
    connection = sqlite3.connect(path)
    try:
        enable_wal(connection, busy_timeout_ms=5000)
    finally:
        connection.close()


class SQLiteBackend:
    """Bytes by key in one SQLite table.

    Args:
        path: the database file (created if missing), or ``:memory:``.
        table: the table name (a plain identifier).
        max_bytes: bound on stored keys + values, of every process sharing the table;
            0 means unbounded.
        clock: Unix seconds (injectable so tests can move time).
    """

    name = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        table: str = "llmrouter_cache",
        max_bytes: int = 128 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not _IDENTIFIER.match(table):
            raise ConfigError(f"config: cache.sqlite_table {table!r} is not a plain SQL identifier")
        self.path = str(path)
        self.table = table
        self.max_bytes = max_bytes
        self._clock = clock
        self._db: aiosqlite.Connection | None = None
        self._opening = anyio.Lock()
        self._evicting = anyio.Lock()  # one eviction at a time; stores meanwhile skip theirs
        self._entries = 0
        self._bytes = 0
        self._stored_since_count = 0
        self._evictions = 0
        self._expirations = 0

    async def start(self) -> None:
        """Open the file and create the table.

        Raises:
            ConfigError: naming ``cache.sqlite_path``, when the file cannot be created,
                opened or written (a read-only directory, a file that is no database).
        """
        async with self._opening:  # concurrent first requests must not open twice
            if self._db is None:
                try:
                    await self._open()
                except (OSError, sqlite3.DatabaseError) as exc:
                    if isinstance(exc, sqlite3.DatabaseError) and not _is_unusable_file(exc):
                        raise  # locked, busy: the file is fine
                    raise ConfigError(
                        f"config: cache.sqlite_path {self.path!r} cannot hold the cache"
                        f" ({type(exc).__name__}: {exc})"
                    ) from exc

    async def _open(self) -> None:
        import aiosqlite

        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # WAL (kept by the file): readers don't block the writer, and the accounting
            # engine may share the file. Set once here, where a worker starting beside
            # another may have to retry it (see llmrouter.sqlite_wal).
            await anyio.to_thread.run_sync(_use_wal, self.path)
        db = await aiosqlite.connect(self.path, isolation_level=None)  # autocommit
        try:
            await db.execute("PRAGMA busy_timeout=5000")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} ("
                " key TEXT PRIMARY KEY, value BLOB NOT NULL, size INTEGER NOT NULL,"
                " expires_at REAL, accessed_at REAL NOT NULL)"
            )
            await db.execute(
                f"CREATE INDEX IF NOT EXISTS {self.table}_accessed ON {self.table} (accessed_at)"
            )
        except BaseException:
            await db.close()
            raise
        self._db = db
        await self._count()

    async def get(self, key: str) -> bytes | None:
        now = self._clock()
        db = await self._conn()
        # One statement: the hit's last access is written as it is read.
        rows = await db.execute_fetchall(
            f"UPDATE {self.table} SET accessed_at = ? WHERE key = ? RETURNING value, expires_at", (now, key)
        )
        if not rows:
            return None
        value, expires_at = next(iter(rows))
        if not isinstance(value, bytes) or not isinstance(expires_at, float | int | None):
            await self._delete_unreadable(key)
            return None
        if expires_at is not None and expires_at <= now:
            await self._delete_expired(key, now)
            return None
        return value

    async def set(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Store ``value``; the counters change by what the statements report they wrote.

        A new key (the usual store, after a miss) is one statement. An existing key is
        deleted, then inserted: each statement reports the row it removed or added, so two
        stores of one key at once count it once (reading its old size in a statement of
        its own, both read "none" and both counted it). A lookup between the two
        statements misses; a store of the key landing between them wins (it holds an
        answer to the same request).
        """
        size = len(key) + len(value)
        if self.max_bytes and size > self.max_bytes:
            return False
        now = self._clock()
        fields = (key, value, size, None if ttl is None else now + ttl, now)
        db = await self._conn()
        insert = (
            f"INSERT INTO {self.table} (key, value, size, expires_at, accessed_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (key) DO NOTHING RETURNING size"
        )
        added = await db.execute_fetchall(insert, fields)
        if not added:
            await self._delete(key)
            added = await db.execute_fetchall(insert, fields)
        if added:
            self._entries += 1
            self._bytes += size
            self._stored_since_count += size
        # Other worker processes store into the same table, unseen by these counters:
        # re-read the true total once this process alone has stored a sixteenth of the
        # bound since the last reading (or its own tally passes the bound). A count reads
        # every row (~40 ms for 128 MiB), so not on every store: amortised, a few percent
        # of the stores' time. With N workers the table can exceed the bound by at most
        # N x max_bytes / 16 until the next reading, which evicts back under it.
        bound = self.max_bytes
        if bound and (self._bytes > bound or self._stored_since_count > bound // _RECOUNT_SHARE):
            if not self._evicting.locked():  # one at a time; stores meanwhile skip theirs
                async with self._evicting:
                    await self._keep_to_bound()
        return True  # by this store, or by one of the same key that won the race

    async def delete(self, key: str) -> None:
        await self._delete(key)

    async def clear(self) -> int:
        db = await self._conn()
        cursor = await db.execute(f"DELETE FROM {self.table}")
        self._entries = self._bytes = self._stored_since_count = 0
        return cursor.rowcount

    async def recount(self) -> None:
        """Re-read the table's true totals for :meth:`stats`: the workers sharing the file
        store into it too, so between readings each one's ``entries`` and ``bytes`` are
        its own view. Reads every row (~40 ms for 128 MiB): for the admin route, not for
        every request."""
        await self._count()

    async def aclose(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    def stats(self) -> BackendStats:
        return BackendStats(
            entries=self._entries,
            bytes=self._bytes,
            evictions=self._evictions,
            expirations=self._expirations,
        )

    async def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            await self.start()
        assert self._db is not None
        return self._db

    async def _delete(self, key: str) -> None:
        db = await self._conn()
        rows = await db.execute_fetchall(f"DELETE FROM {self.table} WHERE key = ? RETURNING size", (key,))
        self._forget(rows)

    async def _delete_expired(self, key: str, now: float) -> None:
        """Delete ``key`` only while it is still expired: a fresh answer stored since the
        lookup read the expired one stays. Counted as an expiry only when a row went."""
        db = await self._conn()
        rows = await db.execute_fetchall(
            f"DELETE FROM {self.table} WHERE key = ? AND expires_at <= ? RETURNING size", (key, now)
        )
        self._expirations += self._forget(rows)

    async def _delete_unreadable(self, key: str) -> None:
        """Delete ``key``'s row while it holds what this cache never writes (a value that
        is not a BLOB, an expiry that is not a number): a miss, not a failing database.
        A fresh entry another worker stored since the lookup stays."""
        log.warning("cache: dropping the unreadable row of key %s in table %s", key, self.table)
        db = await self._conn()
        rows = await db.execute_fetchall(
            f"DELETE FROM {self.table} WHERE key = ? AND (typeof(value) != 'blob'"
            " OR typeof(expires_at) NOT IN ('real', 'integer', 'null')) RETURNING size",
            (key,),
        )
        self._forget(rows)

    def _forget(self, deleted: Iterable[sqlite3.Row]) -> int:
        """Take rows a ``DELETE ... RETURNING size`` removed off the counters; how many."""
        count = 0
        for (size,) in deleted:
            count += 1
            self._bytes -= size
        self._entries -= count
        return count

    async def _count(self) -> None:
        """Re-read the totals: other processes may share the file."""
        db = await self._conn()
        rows = list(await db.execute_fetchall(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM {self.table}"))
        self._entries, self._bytes = rows[0] if rows else (0, 0)
        self._stored_since_count = 0

    async def _keep_to_bound(self) -> None:
        """Re-read the true total; past the bound, drop the expired rows, then the least
        recently used ones down to 15/16 of the bound: each pass reads every row, so a
        full cache makes one pass per sixteenth stored, not one per store."""
        await self._count()
        if self._bytes <= self.max_bytes:
            return
        target = self.max_bytes - self.max_bytes // _RECOUNT_SHARE
        db = await self._conn()
        expired = await db.execute_fetchall(
            f"DELETE FROM {self.table} WHERE expires_at IS NOT NULL AND expires_at <= ? RETURNING size",
            (self._clock(),),
        )
        self._expirations += self._forget(expired)
        while self._bytes > target:
            rows = await db.execute_fetchall(
                f"SELECT key, size FROM {self.table} ORDER BY accessed_at LIMIT ?", (_EVICT_BATCH,)
            )
            if not rows:
                break
            victims: list[str] = []
            freed = 0
            for key, size in rows:
                if self._bytes - freed <= target:
                    break
                victims.append(key)
                freed += size
            marks = ", ".join("?" * len(victims))  # one statement: one transaction
            deleted = await db.execute_fetchall(
                f"DELETE FROM {self.table} WHERE key IN ({marks}) RETURNING size", victims
            )
            evicted = self._forget(deleted)
            self._evictions += evicted
            if evicted < len(victims):
                await self._count()  # another process evicts too: re-read, not evict its share again


def _is_unusable_file(exc: sqlite3.DatabaseError) -> bool:
    # An extended result code keeps its primary code in its low byte.
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _UNUSABLE_FILE
