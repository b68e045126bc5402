"""The usage ledger: one row per request, written behind the response.

:meth:`LedgerWriter.record` is synchronous and cheap: it journals the row (see
:mod:`llmrouter.accounting.journal`) and queues it. A background task writes queued
rows in batches; when the database fails, the rows stay queued (and journaled) and the
batch is retried with backoff. Inserts ignore an ``entry_id`` already present, so a
batch retried after an ambiguous failure, or a journal replayed at start-up, never
bills twice. :meth:`LedgerWriter.aclose` flushes what is left.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy import BigInteger, Integer, String
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from llmrouter.accounting.db import is_sqlite
from llmrouter.accounting.journal import Journal, orphaned_rows, release_orphan
from llmrouter.accounting.models import LedgerRow
from llmrouter.accounting.sqlite_ledger import SQLiteInserter, is_refused
from llmrouter.context import new_id

if TYPE_CHECKING:
    from llmrouter.context import RequestContext

__all__ = ["LedgerWriter", "insert_rows", "row_from_context"]

log = logging.getLogger("llmrouter.accounting.ledger")
_TABLE: Any = LedgerRow.__table__  # type: ignore[attr-defined]
_COLUMNS = frozenset(c.name for c in _TABLE.columns) - {"id"}
_DEFAULTS = {
    c.name: (c.default.arg if c.default is not None and not callable(c.default.arg) else None)
    for c in _TABLE.columns
    if c.name != "id"
}
Sink = Callable[[Sequence[dict[str, Any]]], Awaitable[None]]
# What each column can hold. Some values come from clients (the model name asked for,
# kept even when unknown) or upstreams (model, error code, token counts); PostgreSQL
# refuses a string over its VARCHAR length, a NUL byte or an INTEGER past int32, and one
# refused row would fail its whole batch on every retry, stalling the ledger for good.
_STR_LIMITS: tuple[tuple[str, int | None], ...] = tuple(
    (c.name, getattr(c.type, "length", None))
    for c in _TABLE.columns
    # SQLModel's AutoString wraps String (a TypeDecorator); Text has no length.
    if isinstance(c.type, String) or isinstance(getattr(c.type, "impl", None), String)
)
_INT_LIMITS: tuple[tuple[str, int], ...] = tuple(
    (c.name, 2**63 - 1 if isinstance(c.type, BigInteger) else 2**31 - 1)
    for c in _TABLE.columns
    if isinstance(c.type, Integer) and c.name != "id"
)


_SECONDS_PER_DAY = 86400  # Unix time has no leap seconds: every UTC day is this long
_last_day: tuple[int, str] = (-1, "")


def utc_day(ts: float) -> str:
    """``YYYY-MM-DD`` of ``ts`` in UTC (formatted once per day: this runs per request)."""
    global _last_day
    number = int(ts // _SECONDS_PER_DAY)
    if number != _last_day[0]:
        _last_day = (number, datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d"))
    return _last_day[1]


def row_from_context(
    ctx: RequestContext, *, status: str | None = None, error_code: str | None = None
) -> dict[str, Any]:
    """The ledger row for a finished (or rejected) request."""
    usage = ctx.usage
    error = ctx.error
    return {
        "entry_id": new_id(),
        "request_id": ctx.request_id,
        "created_at": ctx.created,
        "day": utc_day(ctx.created),
        "api_key_id": ctx.api_key_id,
        "operation": ctx.operation,
        "stream": ctx.stream,
        "model_group": ctx.model_group,
        "deployment": ctx.deployment,
        "provider": ctx.provider,
        "upstream_model": ctx.upstream_model,
        "prompt_tokens": usage.prompt_tokens if usage else 0,
        "completion_tokens": usage.completion_tokens if usage else 0,
        "cached_tokens": usage.cached_tokens if usage else 0,
        "cost": float(ctx.cost or 0.0),
        "cost_source": ctx.cost_source,
        "usage_estimated": bool(usage.estimated) if usage else False,
        "cache_status": ctx.cache_status,
        "latency_ms": ctx.latency_ms,
        "ttft_ms": ctx.ttft_ms,
        "status": status or ctx.status or "error",
        "error_code": error_code or (error.code if error is not None else None),
        "attempts": ctx.attempts,
    }


async def insert_rows(engine: AsyncEngine, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ledger rows in one transaction, skipping request ids already recorded."""
    if not rows:
        return
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    statement = insert(_TABLE).on_conflict_do_nothing(index_elements=["entry_id"])
    async with engine.begin() as conn:
        await conn.execute(statement, clean_rows(rows))


def clean_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with every column (executemany takes its column list from the first
    row), and every value storable. Rows that already are come back as they are."""
    return [_clean(row) for row in rows]


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    if row.keys() != _COLUMNS:
        return _fit(_complete(row))
    return row if _fits(row) else _fit(dict(row))  # a copy: the caller's row stays as it was


def _complete(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with the ledger's columns only, a default for each one it lacks."""
    return {**_DEFAULTS, **{k: v for k, v in row.items() if k in _COLUMNS}}


def default_sink(engine: AsyncEngine) -> tuple[Sink, Callable[[], None]]:
    """The insert for ``engine``, and what closes it: plain sqlite3 in a thread for a
    SQLite file (see :mod:`llmrouter.accounting.sqlite_ledger`), else :func:`insert_rows`."""
    database = engine.url.database
    if is_sqlite(engine) and database and database != ":memory:" and "mode=memory" not in str(engine.url):
        inserter = SQLiteInserter(database, _TABLE.name, sorted(_COLUMNS))

        async def sqlite_sink(rows: Sequence[dict[str, Any]]) -> None:
            await inserter(clean_rows(rows))

        return sqlite_sink, inserter.close
    return (lambda rows: insert_rows(engine, rows)), lambda: None


def _fits(row: dict[str, Any]) -> bool:
    """True when :func:`_fit` would change nothing: the common case (this runs for every
    row). A value of another type than its column's is left to :func:`_fit`. A plain
    loop over the columns: C-level ``map(str, ...)`` and ``map(len, ...)`` over the
    values, or ``zip``, cost more (28k and 20k instructions a row; this, 15k)."""
    for name, length in _STR_LIMITS:
        value = row[name]
        if value is not None and (
            value.__class__ is not str or "\x00" in value or (length is not None and len(value) > length)
        ):
            return False
    for name, most in _INT_LIMITS:
        value = row[name]
        if value.__class__ is not int or not 0 <= value <= most:
            return False
    return True


def _fit(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` (every column present) with every value made storable: strings without
    NUL and cut to their column's length, integers within their column's range (counts
    are never negative). Only for rows that :func:`_fits` did not pass."""
    for name, length in _STR_LIMITS:
        value = row[name]
        if isinstance(value, str) and ("\x00" in value or (length is not None and len(value) > length)):
            value = value.replace("\x00", "")
            row[name] = value[:length] if length else value
    for name, most in _INT_LIMITS:
        value = row[name]
        if isinstance(value, int) and not 0 <= value <= most:  # bools are 0 or 1: always fit
            row[name] = min(max(value, 0), most)
    return row


REJECTED_FILE = "rejected.jsonl"


def refused_data(exc: BaseException) -> bool:
    """True when the database refused the rows themselves (a value out of range, a
    constraint), which retrying cannot fix; False for a lost connection or a timeout."""
    if isinstance(exc, (DataError, IntegrityError)) or is_refused(exc):
        return True
    # Raised before the database saw the statement (a value the driver cannot bind).
    return isinstance(exc, StatementError) and not isinstance(exc, DBAPIError)


class LedgerWriter:
    """Batches ledger rows into the database without ever blocking a response.

    Args:
        engine: the accounting database.
        batch_size: rows per insert.
        flush_interval: seconds between writes when rows trickle in.
        journal_dir: where rows are journaled before they count as recorded (None: memory only).
        shutdown_timeout: how long :meth:`aclose` retries a failing database.
        sink: replaces the database insert (tests inject outages through it).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_size: int = 200,
        flush_interval: float = 0.25,
        journal_dir: str | None = None,
        shutdown_timeout: float = 10.0,
        sink: Sink | None = None,
    ) -> None:
        self._engine = engine
        self._batch_size = max(1, batch_size)
        self._flush_interval = flush_interval
        self._journal_dir = journal_dir
        self._journal: Journal | None = None
        self._shutdown_timeout = shutdown_timeout
        self._close_sink: Callable[[], None] = lambda: None
        if sink is None:
            sink, self._close_sink = default_sink(engine)
        self._sink: Sink = sink
        self._queue: deque[tuple[int, dict[str, Any]]] = deque()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._write_lock = anyio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0
        self.rejected = 0
        """Rows the database refused on their own, set aside in ``journal_dir/rejected.jsonl``."""
        self.failures = 0
        self.unjournaled = 0
        """Rows queued without a journal line (the journal's disk failed): lost if the
        process dies before they are written."""
        self.last_error: str | None = None

    @property
    def pending(self) -> int:
        """Rows acknowledged but not yet in the database."""
        return len(self._queue)

    async def start(self) -> int:
        """Replay rows journaled by dead processes, then start the background writer.

        Returns:
            The number of rows replayed.
        """
        replayed = 0
        if self._journal_dir is not None:
            for folder, rows, fd in orphaned_rows(self._journal_dir):
                try:
                    for i in range(0, len(rows), self._batch_size):
                        await self._write(rows[i : i + self._batch_size])
                except Exception:
                    release_orphan(folder, fd, replayed=False)
                    raise
                release_orphan(folder, fd, replayed=True)
                replayed += len(rows)
            self._journal = Journal(self._journal_dir)
        if replayed:
            log.info("ledger: replayed %d journaled rows", replayed)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="llmrouter-ledger-writer")
        return replayed

    def record(self, row: dict[str, Any]) -> None:
        """Acknowledge a row: journal it, queue it; it will reach the database."""
        if self._closing and self._task is None:
            raise RuntimeError("ledger writer is closed")
        segment = 0
        if self._journal is not None:
            try:
                segment = self._journal.append(row)
            except OSError as exc:
                # A full disk, say: the row still goes to the database, only unjournaled
                # (tagged with the current segment, so no older segment is dropped early).
                segment = self._journal.segment
                self.unjournaled += 1
                log.error(
                    "ledger: journaling row %s failed (%s); it is queued in memory", row.get("entry_id"), exc
                )
        self._queue.append((segment, row))
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    async def _run(self) -> None:
        backoff = 0.1
        while not self._closing:
            with anyio.move_on_after(self._flush_interval):
                await self._wake.wait()
            self._wake.clear()
            if await self._write_available():
                backoff = 0.1
            elif not self._closing:
                with anyio.move_on_after(backoff):
                    await self._stop.wait()  # back off, but wake at once for shutdown
                backoff = min(backoff * 2, 5.0)

    async def _write_available(self) -> bool:
        """Write everything queued now, batch by batch; False on a database failure."""
        async with self._write_lock:
            while self._queue:
                batch = [row for _, row in itertools.islice(self._queue, self._batch_size)]
                try:
                    await self._write(batch)
                except Exception as exc:  # noqa: BLE001 - any failure: keep the rows, retry later
                    self.failures += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning(
                        "ledger: write of %d rows failed, will retry: %s", len(batch), self.last_error
                    )
                    return False
                for _ in batch:
                    self._queue.popleft()
                self.written += len(batch)
                self._trim_journal()
            return True

    async def _write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert ``rows``. When the database refuses the data itself (not a lost
        connection), insert them one by one and set aside those it refuses alone, so
        that one bad row cannot stall every row behind it. Transient failures raise."""
        try:
            await self._sink(rows)
        except Exception as exc:
            if not refused_data(exc) or len(rows) == 0:
                raise
            for row in rows:
                try:
                    await self._sink([row])
                except Exception as row_exc:
                    if not refused_data(row_exc):
                        raise
                    self._set_aside(row, row_exc)

    def _set_aside(self, row: dict[str, Any], exc: Exception) -> None:
        # Kept, not dropped: an operator can fix and re-insert it (docs/accounting.md).
        self.rejected += 1
        line = json.dumps({"row": row, "error": f"{type(exc).__name__}: {exc}"}, default=str)
        if self._journal_dir is None:
            log.error("ledger: the database refused a row (set aside): %s", line)
            return
        path = Path(self._journal_dir) / REJECTED_FILE
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")
        log.error("ledger: the database refused a row; set aside in %s: %s", path, exc)

    def _trim_journal(self) -> None:
        if self._journal is None:
            return
        # Every segment older than the oldest queued row's is done.
        self._journal.drop_before(self._queue[0][0] if self._queue else self._journal.segment)

    async def flush(self) -> None:
        """Write everything queued now (reports call this to read their own writes).

        Raises:
            RuntimeError: the database refused the rows (they stay queued).
        """
        if not await self._write_available():
            raise RuntimeError(f"ledger flush failed: {self.last_error}")

    async def aclose(self) -> None:
        """Stop the writer and flush, retrying until ``shutdown_timeout``; rows the
        database still refuses stay in the journal for the next start."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        self._stop.set()
        if self._task is not None:
            # Let a batch in flight finish rather than cancel it: a SQLite connection
            # abandoned mid-insert can keep the write lock and block the final flush.
            with anyio.CancelScope(shield=True):
                await asyncio.gather(self._task, return_exceptions=True)
        deadline = time.monotonic() + self._shutdown_timeout
        delay = 0.1
        with anyio.CancelScope(shield=True):
            while not await self._write_available() and time.monotonic() < deadline:
                await anyio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 2.0)
        if self._queue:
            where = f"left in {self._journal.folder}" if self._journal else "LOST (no journal_dir)"
            log.error("ledger: %d rows not written at shutdown: %s", len(self._queue), where)
        if self._journal is not None:
            self._journal.close(committed=not self._queue)
        self._close_sink()
        self._task = None
