"""A small versioned migration runner (``llmrouter db upgrade``).

The applied versions live in ``llmr_schema_version``. :func:`upgrade` is idempotent
and safe while other replicas run: on PostgreSQL the whole upgrade is one transaction
under an advisory lock (DDL is transactional there), so two replicas starting together
apply each step once; on SQLite an ``flock`` on ``<database>.lock`` serialises upgrades
(its DDL is autocommitted, so a transaction alone would not).

Rules for new migrations, so that a running deployment keeps working while they apply:
only additive changes (new tables, new nullable columns, new indexes); never rename or
drop in the same release that stops using a column (an index no release reads may go).
Migration 1 creates the tables as ``models.py`` defines them today; later migrations
must spell out their DDL and leave a database that migration 1 made today unchanged.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import Connection, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine

from llmrouter.accounting.models import TABLES, SchemaVersionRow

__all__ = ["MIGRATIONS", "Migration", "current_version", "upgrade"]

_ADVISORY_LOCK_ID = 0x6C6C6D72  # "llmr"


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _create_v1(conn: Connection) -> None:
    for table in TABLES:
        table.create(conn, checkfirst=True)


def _drop_unused_ledger_indexes(conn: Connection) -> None:
    # No query reads them, and each one cost every ledger insert ~8k CPU instructions
    # (~13% of a SQLite row). Reports filter on (api_key_id, created_at).
    for name in ("ix_llmr_ledger_request_id", "ix_llmr_ledger_day"):
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")


def _add_budget_version(conn: Connection) -> None:
    # Migration 1 of this release already made the column; one of an earlier release did not.
    if "budget_version" not in {column["name"] for column in inspect(conn).get_columns("llmr_api_keys")}:
        conn.exec_driver_sql("ALTER TABLE llmr_api_keys ADD COLUMN budget_version INTEGER")


def _add_end_user(conn: Connection) -> None:
    if "end_user" not in {column["name"] for column in inspect(conn).get_columns("llmr_ledger")}:
        conn.exec_driver_sql("ALTER TABLE llmr_ledger ADD COLUMN end_user VARCHAR(200)")


def _add_budget_reservations(conn: Connection) -> None:
    # Migration 1 of this release already made the table and the column; one of an earlier
    # release did not.
    if "ends_at" not in {column["name"] for column in inspect(conn).get_columns("llmr_budget_counters")}:
        conn.exec_driver_sql("ALTER TABLE llmr_budget_counters ADD COLUMN ends_at DOUBLE PRECISION")
        conn.exec_driver_sql("CREATE INDEX ix_llmr_budget_counters_ends_at ON llmr_budget_counters (ends_at)")
    conn.exec_driver_sql(
        "CREATE TABLE IF NOT EXISTS llmr_budget_reservations ("
        "counter VARCHAR(300) NOT NULL, request_id VARCHAR(200) NOT NULL, "
        "amount_nanos BIGINT NOT NULL, expires_at DOUBLE PRECISION NOT NULL, "
        "PRIMARY KEY (counter, request_id))"
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "api keys, usage ledger, budget counters", _create_v1),
    Migration(2, "drop the ledger's unused request_id and day indexes", _drop_unused_ledger_indexes),
    Migration(3, "api keys: budget_version, for budgets changed after creation", _add_budget_version),
    Migration(4, "ledger: end_user, the request's OpenAI user field", _add_end_user),
    Migration(
        5,
        "budget reservations with leases, and when each counter's window ends",
        _add_budget_reservations,
    ),
)

_VERSION_TABLE: Any = SchemaVersionRow.__table__  # type: ignore[attr-defined]


def _read_version(conn: Connection) -> int:
    if not inspect(conn).has_table(_VERSION_TABLE.name):
        return 0
    versions = conn.execute(select(_VERSION_TABLE.c.version)).scalars().all()
    return max(versions, default=0)


def _upgrade_sync(conn: Connection) -> list[int]:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK_ID})")
    _VERSION_TABLE.create(conn, checkfirst=True)
    current = _read_version(conn)
    applied = []
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        migration.apply(conn)
        conn.execute(
            _VERSION_TABLE.insert().values(
                version=migration.version, description=migration.description, applied_at=time.time()
            )
        )
        applied.append(migration.version)
    return applied


@asynccontextmanager
async def _sqlite_lock(engine: AsyncEngine) -> AsyncIterator[None]:
    """Serialise upgrades of one SQLite file: its DDL runs outside transactions (the
    driver autocommits it), so the database alone cannot make an upgrade atomic. An
    ``flock`` on a file beside it can (SQLite files are local to one host anyway)."""
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or path == ":memory:":
        yield
        return
    fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        await anyio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


async def upgrade(engine: AsyncEngine) -> list[int]:
    """Apply pending migrations; returns the versions applied (empty when up to date)."""
    async with _sqlite_lock(engine), engine.begin() as conn:
        return await conn.run_sync(_upgrade_sync)


async def current_version(engine: AsyncEngine) -> int:
    """The schema version of the database (0 when empty)."""
    async with engine.connect() as conn:
        return await conn.run_sync(_read_version)


def latest_version() -> int:
    return MIGRATIONS[-1].version
