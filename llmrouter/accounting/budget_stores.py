"""Budget stores shared by replicas: Redis (Lua scripts) and the SQL database.

Both keep ``spent`` and ``reserved`` per window in integer nano-dollars and make
check-and-reserve one atomic step. Each reservation is a lease, freed when its replica
dies without settling it. Spend is seeded from the ledger when a window's counter does
not exist yet (first use, or Redis restarted empty).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from llmrouter.accounting import pg_budgets, sqlite_budgets
from llmrouter.accounting.budgets import BudgetWindow, EndedWindows, SeedFn
from llmrouter.accounting.db import asyncpg_connection, is_postgres, sqlite_file
from llmrouter.accounting.models import BudgetCounterRow
from llmrouter.accounting.sqlite_budgets import SQLiteRunner
from llmrouter.aio import within

__all__ = ["DatabaseBudgetStore", "RedisBudgetStore"]

T = TypeVar("T")

# KEYS[1] = counter hash, KEYS[2] = reservation leases (zset: request id -> deadline)
# ARGV = amount, limit, request id, lease seconds
_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
-- free the reservations of requests whose replica died (lease expired)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, rid in ipairs(dead) do
  local held = tonumber(redis.call('HGET', KEYS[1], 'r:' .. rid) or '0')
  redis.call('HINCRBY', KEYS[1], 'reserved', -held)
  redis.call('HDEL', KEYS[1], 'r:' .. rid)
  redis.call('ZREM', KEYS[2], rid)
end
local amount = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
local ok
if amount == 0 then ok = spent + reserved < limit else ok = spent + reserved + amount <= limit end
if not ok then return {0, spent, reserved} end
if amount > 0 then
  redis.call('HINCRBY', KEYS[1], 'reserved', amount)
  redis.call('HINCRBY', KEYS[1], 'r:' .. ARGV[3], amount)
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
  -- the leases of a dead replica go when the window's counter does
  local ttl = redis.call('TTL', KEYS[1])
  if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
end
return {1, spent, reserved + amount}
"""

# ARGV = request id, actual, 1 to settle only a reservation still held (a retry)
_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local held = tonumber(redis.call('HGET', KEYS[1], 'r:' .. ARGV[1]) or '0')
if held > 0 then
  redis.call('HINCRBY', KEYS[1], 'reserved', -held)
  redis.call('HDEL', KEYS[1], 'r:' .. ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
elseif ARGV[3] == '1' then
  return tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
end
return redis.call('HINCRBY', KEYS[1], 'spent', tonumber(ARGV[2]))
"""

# ARGV = spent seed, ttl seconds (0 = none)
_SEED = """
redis.call('HSETNX', KEYS[1], 'spent', ARGV[1])
redis.call('HSETNX', KEYS[1], 'reserved', 0)
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


class RedisBudgetStore:
    """Budget counters in Redis, shared by every replica.

    Args:
        client: a ``redis.asyncio.Redis`` (injected: tests point it at 127.0.0.1).
        seed: returns a window's spend from the ledger.
        prefix: key prefix (one per deployment or test run).
        lease_seconds: a reservation not settled within this long is freed (its replica
            is presumed dead); keep it above the longest request.
    """

    def __init__(
        self, client: Any, seed: SeedFn, *, prefix: str = "llmrouter:", lease_seconds: float = 900.0
    ) -> None:
        self._redis = client
        self._seed = seed
        self._prefix = f"{prefix}budget:"
        self._lease = lease_seconds
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._seed_script = client.register_script(_SEED)

    def _keys(self, window: BudgetWindow) -> list[str]:
        base = f"{self._prefix}{{{window.counter}}}"  # hash tag: both keys on one cluster slot
        return [base, f"{base}:leases"]

    async def _ensure(self, window: BudgetWindow) -> None:
        spent = await self._seed(window)
        ttl = int(window.end - time.time()) + 86400 if window.end is not None else 0
        await self._seed_script(keys=self._keys(window)[:1], args=[spent, ttl])

    async def reserve(self, window: BudgetWindow, amount: int, request_id: str) -> tuple[bool, int, int]:
        keys = self._keys(window)
        args = [amount, window.limit, request_id, self._lease]
        ok, spent, reserved = await self._reserve(keys=keys, args=args)
        if ok == -1:
            await self._ensure(window)
            ok, spent, reserved = await self._reserve(keys=keys, args=args)
        return ok == 1, int(spent), int(reserved)

    async def settle(
        self, window: BudgetWindow, reserved: int, actual: int, request_id: str, *, again: bool = False
    ) -> int:
        keys = self._keys(window)
        args = [request_id, actual, 1 if again and reserved else 0]
        spent = int(await self._settle(keys=keys, args=args))
        if spent == -1:  # Redis lost the window (restart): re-seed from the ledger, then settle
            await self._ensure(window)
            spent = int(await self._settle(keys=keys, args=args))
        return spent

    async def usage(self, window: BudgetWindow) -> tuple[int, int]:
        spent, reserved = await self._redis.hmget(self._keys(window)[0], ["spent", "reserved"])
        if spent is None:
            return await self._seed(window), 0
        return int(spent), int(reserved or 0)

    async def aclose(self) -> None:
        """The client belongs to the caller (shared with the limiter)."""


_COUNTERS: Any = BudgetCounterRow.__table__  # type: ignore[attr-defined]

ROWS_KEPT = 86400.0
"""Seconds a counter's row stays in the database after its window ends."""


class DatabaseBudgetStore:
    """Budget counters in the accounting database: PostgreSQL through asyncpg
    (:mod:`~llmrouter.accounting.pg_budgets`), a SQLite file through ``sqlite3`` in a
    worker thread (:mod:`~llmrouter.accounting.sqlite_budgets`).

    The reservation is one conditional ``UPDATE``: PostgreSQL re-checks the ``WHERE``
    after taking the row lock, and SQLite has a single writer, so concurrent requests
    on any replica cannot both pass the check. Each reservation also writes a lease row
    (``llmr_budget_reservations``) that settling deletes; a replica that dies
    mid-request leaves its lease behind, and once ``lease_seconds`` have passed the
    next request the window would refuse frees it and is checked again (as
    ``usage`` does), so a crash costs the budget nothing for long. Counters of windows
    that ended over :data:`ROWS_KEPT` ago are deleted, with their leases.

    Args:
        engine: the accounting database.
        seed: returns a window's spend from the ledger.
        timeout: seconds a reservation, a settling or a reading may take before
            ``TimeoutError`` (None: no bound); the abandoned statement is cancelled in
            the background.
        lease_seconds: a reservation not settled within this long is freed (its replica
            is presumed dead); keep it above the longest request.
        clock: the time for leases (Unix seconds; tests move it).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        seed: SeedFn,
        *,
        timeout: float | None = None,
        lease_seconds: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._seed = seed
        self._timeout = timeout  # for each reservation and settling
        self._lease = lease_seconds
        self._clock = clock
        self._known: set[str] = set()
        self._ended = EndedWindows(clock)
        self._next_cleanup = 0.0
        self._postgres = is_postgres(engine)
        path = sqlite_file(engine)
        self._sqlite = SQLiteRunner(path) if path is not None else None

    async def _ensure(self, window: BudgetWindow) -> None:
        if window.counter in self._known:
            return
        async with self._engine.connect() as conn:
            exists = (
                await conn.execute(select(_COUNTERS.c.counter).where(_COUNTERS.c.counter == window.counter))
            ).first()
        if exists is None:
            spent = await self._seed(window)
            insert = pg_insert if self._postgres else sqlite_insert
            statement = insert(_COUNTERS).values(
                counter=window.counter, spent_nanos=spent, reserved_nanos=0, ends_at=window.end
            )
            async with self._engine.begin() as conn:
                await conn.execute(statement.on_conflict_do_nothing(index_elements=["counter"]))
        self._known.add(window.counter)
        self._known.difference_update(self._ended.add(window))
        if self._clock() >= self._next_cleanup:
            # Every day's counter of every key and end user would otherwise stay forever.
            self._next_cleanup = self._clock() + 3600.0
            await self._run(pg_budgets.forget_ended, sqlite_budgets.forget_ended, self._clock() - ROWS_KEPT)

    async def reserve(self, window: BudgetWindow, amount: int, request_id: str) -> tuple[bool, int, int]:
        return await within(self._timeout, self._reserve(window, amount, request_id))

    async def _reserve(self, window: BudgetWindow, amount: int, request_id: str) -> tuple[bool, int, int]:
        await self._ensure(window)
        row = await self._take(window, amount, request_id)
        if row is None and await self._sweep(window):  # a dead replica's reservations were in the way
            row = await self._take(window, amount, request_id)
        if row is not None:
            return True, int(row[0]), int(row[1])
        spent, reserved = await self._read(window)
        return False, spent, reserved

    async def _take(self, window: BudgetWindow, amount: int, request_id: str) -> Any:
        """The conditional ``UPDATE`` and the lease: the counter's (spent, reserved) after
        it, or None when the window cannot take ``amount``."""
        deadline = self._clock() + self._lease
        args = (window.counter, amount, window.limit, request_id, deadline)
        return await self._run(pg_budgets.take, sqlite_budgets.take, *args)

    async def _sweep(self, window: BudgetWindow) -> int:
        """Free the window's expired leases; returns the nano-dollars they held."""
        return await self._run(pg_budgets.sweep, sqlite_budgets.sweep, window.counter, self._clock())

    async def settle(
        self, window: BudgetWindow, reserved: int, actual: int, request_id: str, *, again: bool = False
    ) -> int:
        """Add ``actual`` to spent and give back what the request's lease holds (``reserved``
        unless the lease expired and was freed already)."""
        return await within(self._timeout, self._settle(window, actual, request_id, again and reserved > 0))

    async def _settle(self, window: BudgetWindow, actual: int, request_id: str, only_held: bool) -> int:
        await self._ensure(window)
        args = (window.counter, request_id, actual, only_held)
        spent = await self._run(pg_budgets.settle, sqlite_budgets.settle, *args)
        if spent is None:
            raise LookupError(f"budget counter {window.counter!r} is missing")
        return int(spent)

    async def usage(self, window: BudgetWindow) -> tuple[int, int]:
        return await within(self._timeout, self._usage(window))

    async def _usage(self, window: BudgetWindow) -> tuple[int, int]:
        await self._ensure(window)
        await self._sweep(window)
        return await self._read(window)

    async def _read(self, window: BudgetWindow) -> tuple[int, int]:
        row = await self._run(pg_budgets.read, sqlite_budgets.read, window.counter)
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def _run(
        self, on_postgres: Callable[..., Awaitable[T]], on_sqlite: Callable[..., T], *args: Any
    ) -> T:
        """One statement's work: on asyncpg's connection, on the store's own connection to
        a SQLite file, or (a database in memory) on the engine's, in a transaction."""
        if self._postgres:
            async with asyncpg_connection(self._engine) as connection:
                return await on_postgres(connection, *args)
        if self._sqlite is not None:
            return await self._sqlite(on_sqlite, *args)
        async with self._engine.begin() as conn:
            return await conn.run_sync(lambda sync: on_sqlite(sync.connection.cursor(), *args))

    async def aclose(self) -> None:
        self._known.clear()
        if self._sqlite is not None:
            self._sqlite.close()
