"""The ``database`` budget store's statements on PostgreSQL, on asyncpg's connection.

Each is one statement that commits on its own: through SQLAlchemy's ``engine.begin()``
they were BEGIN, the statement and COMMIT, and a reserve and its settle cost the gateway
2.4-2.9 ms of CPU and 3.8-5.0 ms of wall time; this way ~1.0 / ~1.8 ms (the pool's
pre-ping stays, for connections a database restart left dead). A reservation is the
counter's conditional ``UPDATE`` and its lease row in one statement; settling deletes
the lease and gives back what it held (nothing when a sweep freed it first: the lease's
row lock lets only one of them have it). PostgreSQL re-checks the ``UPDATE``'s ``WHERE``
after taking the counter's row lock, so concurrent requests on any replica cannot both
pass the check. The functions mirror :mod:`llmrouter.accounting.sqlite_budgets`.
"""

from __future__ import annotations

from typing import Any

from llmrouter.accounting.models import BudgetCounterRow, BudgetReservationRow

__all__ = ["forget_ended", "read", "settle", "sweep", "take"]

_COUNTERS = BudgetCounterRow.__tablename__
_LEASES = BudgetReservationRow.__tablename__

# $1 counter, $2 amount, $3 limit, $4 request id, $5 lease deadline
_TAKE = (
    f"WITH taken AS (UPDATE {_COUNTERS} SET reserved_nanos = reserved_nanos + $2 WHERE counter = $1 "
    "AND spent_nanos + reserved_nanos + $2 <= $3 RETURNING spent_nanos, reserved_nanos), "
    f"lease AS (INSERT INTO {_LEASES} (counter, request_id, amount_nanos, expires_at) "
    "SELECT $1, $4::varchar, $2, $5::float8 FROM taken "
    f"ON CONFLICT (counter, request_id) DO UPDATE SET amount_nanos = {_LEASES}.amount_nanos "
    "+ EXCLUDED.amount_nanos, expires_at = EXCLUDED.expires_at) "
    "SELECT spent_nanos, reserved_nanos FROM taken"
)
# $1 counter, $2 limit
_UNSPENT = (
    f"SELECT spent_nanos, reserved_nanos FROM {_COUNTERS} WHERE counter = $1 "
    "AND spent_nanos + reserved_nanos < $2"
)
# $1 counter, $2 request id, $3 what was spent
_SETTLE = (
    f"WITH freed AS (DELETE FROM {_LEASES} WHERE counter = $1 AND request_id = $2 "
    f"RETURNING amount_nanos) UPDATE {_COUNTERS} SET reserved_nanos = reserved_nanos "
    "- COALESCE((SELECT amount_nanos FROM freed), 0), spent_nanos = spent_nanos + $3 "
    "WHERE counter = $1 RETURNING spent_nanos"
)
# The same, only while the lease is there.
_SETTLE_HELD = (
    f"WITH freed AS (DELETE FROM {_LEASES} WHERE counter = $1 AND request_id = $2 "
    f"RETURNING amount_nanos), done AS (UPDATE {_COUNTERS} SET reserved_nanos = reserved_nanos "
    "- freed.amount_nanos, spent_nanos = spent_nanos + $3 FROM freed WHERE counter = $1 "
    "RETURNING spent_nanos) SELECT spent_nanos FROM done"
)
# $1 counter, $2 now
_SWEEP = (
    f"WITH dead AS (DELETE FROM {_LEASES} WHERE counter = $1 AND expires_at < $2 "
    "RETURNING amount_nanos), freed AS (SELECT COALESCE(SUM(amount_nanos), 0) AS nanos FROM dead), "
    f"gone AS (UPDATE {_COUNTERS} SET reserved_nanos = reserved_nanos - freed.nanos FROM freed "
    "WHERE counter = $1 AND freed.nanos > 0) SELECT nanos FROM freed"
)
# $1 a time
_FORGET_ENDED = (
    f"WITH gone AS (DELETE FROM {_COUNTERS} WHERE ends_at < $1 RETURNING counter) "
    f"DELETE FROM {_LEASES} AS lease USING gone WHERE lease.counter = gone.counter"
)
_READ = f"SELECT spent_nanos, reserved_nanos FROM {_COUNTERS} WHERE counter = $1"


async def take(
    connection: Any, counter: str, amount: int, limit: int, request_id: str, deadline: float
) -> Any:
    """Reserve ``amount`` under ``limit`` with a lease until ``deadline``: the counter's
    (spent, reserved) after it, or None when the window cannot take it. Reserving
    nothing only needs the window not spent, and holds no lease."""
    if not amount:
        return await connection.fetchrow(_UNSPENT, counter, limit)
    return await connection.fetchrow(_TAKE, counter, amount, limit, request_id, deadline)


async def settle(connection: Any, counter: str, request_id: str, actual: int, only_held: bool = False) -> Any:
    """Add ``actual`` to spent and give back what the request's lease holds (nothing
    when a sweep freed it first); the new spent, or None without the counter. With
    ``only_held``, a settlement whose lease is gone (settled before) changes nothing."""
    spent = await connection.fetchval(_SETTLE_HELD if only_held else _SETTLE, counter, request_id, actual)
    if spent is None and only_held:
        row = await read(connection, counter)
        return None if row is None else row[0]
    return spent


async def sweep(connection: Any, counter: str, now: float) -> int:
    """Free the counter's leases that expired before ``now``; what they held."""
    return int(await connection.fetchval(_SWEEP, counter, now))


async def forget_ended(connection: Any, before: float) -> None:
    """Delete the counters of windows that ended before ``before``, and their leases."""
    await connection.execute(_FORGET_ENDED, before)


async def read(connection: Any, counter: str) -> Any:
    """The counter's (spent, reserved), or None."""
    return await connection.fetchrow(_READ, counter)
