"""The usage ledger: one row per request, written behind the response.

:meth:`LedgerWriter.record` is synchronous and cheap: it journals the row (see
:mod:`llmrouter.accounting.journal`) and queues it. A background task writes queued
rows in batches (when a batch is full, or every ``flush_interval``); when the
database fails, the rows stay queued (and journaled) and the batch is retried with
backoff. Inserts ignore an ``entry_id`` already present, so a
batch retried after an ambiguous failure, or a journal replayed at start-up, never
bills twice. :meth:`LedgerWriter.aclose` flushes what is left.

A request in flight is journaled too, when it is admitted (:meth:`LedgerWriter.open`):
what its row needs should its process die before it finishes (see
:mod:`llmrouter.accounting.in_flight`). Its finished row has the same ``entry_id`` and
replaces it; a replay inserts the rows of requests that never finished, and hands back
what each held (its budget reservation) for the caller to settle.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from llmrouter.accounting.db import is_postgres, sqlite_file
from llmrouter.accounting.entry import FIELDS, LedgerEntry, as_entry, storable, storable_values, utc_day
from llmrouter.accounting.in_flight import SHUTDOWN, InFlight, Interrupted, rows_to_replay
from llmrouter.accounting.journal import Journal, orphaned_rows, release_orphan
from llmrouter.accounting.models import LedgerRow
from llmrouter.accounting.retries import WAITING_LIMIT
from llmrouter.accounting.sqlite_ledger import SQLiteInserter, is_refused
from llmrouter.aio import within
from llmrouter.context import new_id

if TYPE_CHECKING:
    from llmrouter.context import RequestContext

__all__ = ["LedgerWriter", "insert_rows", "row_from_context"]

log = logging.getLogger("llmrouter.accounting.ledger")
_TABLE: Any = LedgerRow.__table__  # type: ignore[attr-defined]
Sink = Callable[[Sequence[LedgerEntry]], Awaitable[None]]

OPEN_GRACE_SECONDS = 1.0
"""How long :meth:`LedgerWriter.aclose` waits for requests still running to record their
own rows before it records them as interrupted."""


async def _finished_by(task: asyncio.Task[Any], deadline: float) -> bool:
    """Wait for ``task`` until ``deadline`` (``time.monotonic()``), without cancelling it,
    and shielded from the caller's cancellation; True when it is done."""
    with anyio.CancelScope(shield=True):
        await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
    return task.done()


def row_from_context(
    ctx: RequestContext,
    *,
    status: str | None = None,
    error_code: str | None = None,
    entry_id: str | None = None,
) -> LedgerEntry:
    """The ledger row for a finished (or rejected) request (``entry_id``: the one its
    :class:`~llmrouter.accounting.in_flight.InFlight` had)."""
    usage = ctx.usage
    error = ctx.error
    # Positional, in field order: msgspec matches keyword arguments one by one, which
    # made building a row five times as expensive.
    return LedgerEntry(
        entry_id or new_id(),
        ctx.request_id,
        ctx.created,  # created_at
        utc_day(ctx.created),  # day
        ctx.api_key_id,
        ctx.operation,
        ctx.stream,
        ctx.model_group,
        ctx.deployment,
        ctx.provider,
        ctx.upstream_model,
        usage.prompt_tokens if usage else 0,
        usage.completion_tokens if usage else 0,
        usage.cached_tokens if usage else 0,
        float(ctx.cost or 0.0),  # cost
        ctx.cost_source,
        bool(usage.estimated) if usage else False,  # usage_estimated
        ctx.cache_status,
        ctx.latency_ms,
        ctx.ttft_ms,
        status or ctx.status or "error",  # status
        error_code or (error.code if error is not None else None),  # error_code
        ctx.attempts,
        ctx.request.end_user if ctx.request is not None else None,
    )


async def insert_rows(engine: AsyncEngine, rows: Sequence[LedgerEntry | Mapping[str, Any]]) -> None:
    """Insert ledger rows in one transaction, skipping entry ids already recorded."""
    if not rows:
        return
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    statement = insert(_TABLE).on_conflict_do_nothing(index_elements=["entry_id"])
    values = [msgspec.structs.asdict(entry) for entry in storable(map(as_entry, rows))]
    async with engine.begin() as conn:
        await conn.execute(statement, values)


def default_sink(engine: AsyncEngine) -> tuple[Sink, Callable[[], None]]:
    """The insert for ``engine``, and what closes it: plain sqlite3 in a thread for a
    SQLite file (see :mod:`llmrouter.accounting.sqlite_ledger`), asyncpg's
    ``executemany`` for PostgreSQL (:mod:`llmrouter.accounting.pg_ledger`), else
    :func:`insert_rows`."""
    database = sqlite_file(engine)
    if database is not None:
        sqlite_inserter = SQLiteInserter(database, _TABLE.name, FIELDS)

        async def sqlite_sink(rows: Sequence[LedgerEntry]) -> None:
            await sqlite_inserter(storable_values(rows))

        return sqlite_sink, sqlite_inserter.close
    if is_postgres(engine):
        from llmrouter.accounting.pg_ledger import PostgresInserter  # imports asyncpg

        pg_inserter = PostgresInserter(engine, _TABLE.name, FIELDS)

        async def postgres_sink(rows: Sequence[LedgerEntry]) -> None:
            await pg_inserter(storable_values(rows))

        return postgres_sink, lambda: None
    return (lambda rows: insert_rows(engine, rows)), lambda: None


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
        self._queue: deque[tuple[int, LedgerEntry]] = deque()
        self._open: dict[str, tuple[int, InFlight]] = {}
        """Requests in flight by entry id, with the segment of their journal line."""
        self._unsettled: dict[str, tuple[int, InFlight]] = {}
        """Finished requests whose settlement waits for its store, likewise (see
        :meth:`keep_unsettled`)."""
        self.interrupted: list[Interrupted] = []
        """Requests recorded as interrupted (replayed by :meth:`start`, or still running at
        :meth:`aclose`) whose holds the caller has not taken yet."""
        self.unsettled: list[InFlight] = []
        """The lines of settlements a dead process left waiting for their store (replayed
        by :meth:`start`), which the caller has not taken yet."""
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
    def journaling(self) -> bool:
        """Rows are journaled (so :meth:`open` keeps requests in flight)."""
        return self._journal is not None

    @property
    def pending(self) -> int:
        """Rows acknowledged but not yet in the database."""
        return len(self._queue)

    async def start(self) -> int:
        """Replay rows journaled by dead processes, then start the background writer.

        A writer stopped and closed may be started again (an app whose lifespan runs
        twice), in the same event loop or another one.

        Returns:
            The number of rows replayed.
        """
        if self._closing:
            self._restart()
        replayed = 0
        if self._journal_dir is not None:
            # This process's journal first: what a dead one left to settle moves into it
            # before the dead one's folder goes.
            self._journal = Journal(self._journal_dir)
            for folder, lines, fd in orphaned_rows(self._journal_dir):
                rows, interrupted, unsettled = rows_to_replay(lines)
                try:
                    for i in range(0, len(rows), self._batch_size):
                        await self._write(rows[i : i + self._batch_size])
                except Exception:
                    release_orphan(folder, fd, replayed=False)
                    self._journal.close(committed=not self._unsettled)
                    raise
                for row, line in interrupted:
                    if line.hold is not None:
                        self.keep_unsettled(line, row.cost)
                for line in unsettled:
                    self.keep_unsettled(line, line.unsettled_cost or 0.0)
                release_orphan(folder, fd, replayed=True)
                replayed += len(rows)
                self.interrupted.extend(interrupted)
                self.unsettled.extend(unsettled)
        if replayed or self.unsettled:
            log.info(
                "ledger: replayed %d journaled rows, %d of them requests interrupted by their "
                "process's end; %d settlements it left waiting",
                replayed,
                len(self.interrupted),
                len(self.unsettled),
            )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="llmrouter-ledger-writer")
        return replayed

    def _restart(self) -> None:
        """Undo what :meth:`stop` and :meth:`close` left: the closing state (which ends the
        writer's loop at once), and events bound to the previous run's event loop."""
        self._closing = False
        self._wake, self._stop = asyncio.Event(), asyncio.Event()
        if self._journal_dir is not None:
            # What a previous run left (rows not written, settlements waiting) is in its
            # journal, which start() replays; kept here too, the rows would carry that
            # journal's segment numbers into the new one, and trim segments still needed.
            self._queue.clear()
            self._unsettled.clear()

    def open(self, request: InFlight) -> None:
        """Journal a request in flight: its interrupted row is recorded should the process
        end before a row with its ``entry_id`` is, and its ``hold`` (anything msgspec
        encodes) is handed back with it in :attr:`interrupted`. Nothing without a journal."""
        if self._journal is None:
            return
        try:
            self._open[request.entry_id] = (self._journal.append(request), request)
        except OSError as exc:
            log.error("ledger: journaling request %s in flight failed (%s)", request.request_id, exc)

    def keep_unsettled(self, request: InFlight, cost: float, model_group: str | None = None) -> None:
        """The request ``request`` has its row recorded, but settling what it held to
        ``cost`` waits for its store (or has yet to be tried: a request a dead process
        left, or one still running at shutdown): journal that, and keep the line (copied
        forward as segments go, the journal kept at shutdown) until :meth:`all_settled`.
        Should the process end first, the next start settles the hold again
        (:attr:`unsettled`); a store settles only what it still holds, so a settlement
        that went through counts once."""
        if self._journal is None:
            return
        # The group that served, which its settlement charges (a fallback's, perhaps).
        line = msgspec.structs.replace(
            request, unsettled_cost=cost, model_group=model_group or request.model_group
        )
        try:
            segment = self._journal.append(line)
        except OSError as exc:
            log.error("ledger: journaling request %s's settlement failed (%s)", line.request_id, exc)
            return
        if len(self._unsettled) >= WAITING_LIMIT:  # as many as the retries keep
            self._unsettled.pop(next(iter(self._unsettled)))
        self._unsettled[line.entry_id] = (segment, line)

    def all_settled(self) -> None:
        """Every settlement that waited for its store went through: their lines may go."""
        self._unsettled.clear()

    def record(self, row: LedgerEntry | Mapping[str, Any]) -> None:
        """Acknowledge a row: journal it, queue it; it will reach the database. A mapping
        is taken as the columns it names, the others at their defaults."""
        if self._closing and self._task is None:
            raise RuntimeError("ledger writer is closed")
        row = as_entry(row)
        if self._open:
            self._open.pop(row.entry_id, None)
        segment = 0
        if self._journal is not None:
            try:
                segment = self._journal.append(row)
            except OSError as exc:
                # A full disk, say: the row still goes to the database, only unjournaled
                # (tagged with the current segment, so no older segment is dropped early).
                segment = self._journal.segment
                self.unjournaled += 1
                log.error("ledger: journaling row %s failed (%s); it is queued in memory", row.entry_id, exc)
        self._queue.append((segment, row))
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    async def _run(self) -> None:
        backoff = 0.1
        while not self._closing:
            with anyio.move_on_after(self._flush_interval) as interval:
                await self._wake.wait()
            self._wake.clear()
            # Woken by a full batch, write full batches only: the rows that came in
            # meanwhile go with the next batch, or at the end of the interval. Chasing
            # them, a few rows per write, cost a thread hop and a commit every few requests.
            if await self._write_available(whole_batches=not interval.cancelled_caught):
                backoff = 0.1
            elif not self._closing:
                with anyio.move_on_after(backoff):
                    await self._stop.wait()  # back off, but wake at once for shutdown
                backoff = min(backoff * 2, 5.0)

    async def _write_available(self, *, whole_batches: bool = False) -> bool:
        """Write everything queued now (or only full batches), batch by batch; False on
        a database failure."""
        least = self._batch_size if whole_batches else 1
        async with self._write_lock:
            while len(self._queue) >= least:
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

    async def _write(self, rows: Sequence[LedgerEntry]) -> None:
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

    def _set_aside(self, row: LedgerEntry, exc: Exception) -> None:
        # Kept, not dropped: an operator can fix and re-insert it (docs/accounting.md).
        self.rejected += 1
        line = json.dumps(
            {"row": msgspec.structs.asdict(row), "error": f"{type(exc).__name__}: {exc}"}, default=str
        )
        if self._journal_dir is None:
            log.error("ledger: the database refused a row (set aside): %s", line)
            return
        path = Path(self._journal_dir) / REJECTED_FILE
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")
        log.error("ledger: the database refused a row; set aside in %s: %s", path, exc)

    def _trim_journal(self) -> None:
        journal = self._journal
        if journal is None:
            return
        # Every segment older than the oldest queued row's is done, once the lines of the
        # requests still in flight there are copied forward.
        done = self._queue[0][0] if self._queue else journal.segment
        for lines in (self._open, self._unsettled):
            if lines and journal.oldest < done:
                done = self._carry(lines, journal, done)
        journal.drop_before(done)

    @staticmethod
    def _carry(lines: dict[str, tuple[int, InFlight]], journal: Journal, done: int) -> int:
        """Copy ``lines`` (of requests in flight, or unsettled) in segments below ``done``
        into the current one (a request running for an hour would otherwise keep an hour
        of segments); returns the segment below which nothing is needed now."""
        for entry_id, (segment, request) in list(lines.items()):
            if segment < done:
                try:
                    lines[entry_id] = (journal.append(request), request)
                except OSError:
                    done = segment  # kept where it is
        return done

    async def flush(self) -> None:
        """Write everything queued now (reports call this to read their own writes).

        Raises:
            RuntimeError: the database refused the rows (they stay queued).
        """
        if not await self._write_available():
            raise RuntimeError(f"ledger flush failed: {self.last_error}")

    async def aclose(self) -> None:
        """:meth:`stop`, then :meth:`close`."""
        await self.stop()
        self.close()

    async def stop(self) -> None:
        """Stop the writer and flush, retrying until ``shutdown_timeout``; requests still
        running are recorded as interrupted (:attr:`interrupted`), and what they hold is
        journaled as waiting to be settled. The journal stays open (for
        :meth:`keep_unsettled`, :meth:`all_settled`) until :meth:`close`.

        Bounded: a database that stopped answering holds nothing here past
        ``shutdown_timeout`` (a write still running then is cancelled); the rows not
        written by then stay in the journal, for the next start to replay.
        """
        if self._closing:
            return
        self._closing = True
        deadline = time.monotonic() + self._shutdown_timeout
        self._wake.set()
        self._stop.set()
        if self._task is not None:
            # Let a batch in flight finish rather than cancel it: a SQLite connection
            # abandoned mid-insert can keep the write lock and block the final flush. But
            # not past the deadline: a write to a database that stopped answering never does.
            if not await _finished_by(self._task, deadline):
                # Cancelled, and left to unwind on its own: no time is left to write anyway.
                self._task.cancel()
                self.last_error = (
                    f"TimeoutError: a write took longer than shutdown_timeout ({self._shutdown_timeout:g}s)"
                )
        if self._open:
            # Requests still running: at a forced shutdown they are being cancelled now, and
            # record their own rows as they unwind, within milliseconds; a moment for that.
            with anyio.CancelScope(shield=True), anyio.move_on_after(OPEN_GRACE_SECONDS):
                while self._open:  # noqa: ASYNC110 - rows arrive through record(), no event to wait on
                    await anyio.sleep(0.01)
        if self._open:
            log.warning(
                "ledger: %d requests still running at shutdown, recorded as interrupted", len(self._open)
            )
            for _, request in list(self._open.values()):
                row = request.row(SHUTDOWN)
                self.record(row)
                self.interrupted.append(Interrupted(row, request))
                if request.hold is not None:  # settled next: should that fail, at the next start
                    self.keep_unsettled(request, row.cost)
        delay = 0.1
        with anyio.CancelScope(shield=True):
            while self._queue and (left := deadline - time.monotonic()) > 0:
                try:
                    # Each try bounded too: a write can hang as long as the database does.
                    if await within(left, self._write_available()):
                        break
                except TimeoutError:
                    self.last_error = (
                        f"TimeoutError: no answer within shutdown_timeout ({self._shutdown_timeout:g}s)"
                    )
                    break
                await anyio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 2.0)
        if self._queue:
            where = f"left in {self._journal.folder}" if self._journal else "LOST (no journal_dir)"
            log.error(
                "ledger: %d rows not written at shutdown (%s): %s", len(self._queue), self.last_error, where
            )
        self._task = None

    def close(self) -> None:
        """Close the journal (after :meth:`stop`): deleted when every row is in the
        database and no settlement waits, else left for the next start to replay."""
        journal, self._journal = self._journal, None
        if journal is not None:
            if self._unsettled:
                # The next start settles them from the journal (a settled one counts once).
                log.warning("ledger: %d settlements wait for their store at shutdown", len(self._unsettled))
            journal.close(committed=not self._queue and not self._unsettled)
        # Kept (closing twice is harmless): a restarted writer's sink reconnects on its
        # first write, and its next close closes that connection.
        self._close_sink()
