"""The async engine: SQLite through aiosqlite (WAL) by default, PostgreSQL through asyncpg."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from llmrouter.accounting.config import DatabaseConfig
from llmrouter.errors import ConfigError
from llmrouter.sqlite_wal import enable_wal

__all__ = [
    "asyncpg_connection",
    "create_engine",
    "is_postgres",
    "is_sqlite",
    "set_sqlite_pragmas",
    "sqlite_file",
]


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def is_postgres(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql"


def sqlite_file(engine: AsyncEngine) -> str | None:
    """The file of a SQLite database, which other connections can open too; None for
    another database or one in memory."""
    database = engine.url.database
    if not is_sqlite(engine) or not database or database == ":memory:" or "mode=memory" in str(engine.url):
        return None
    return database


@asynccontextmanager
async def asyncpg_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """asyncpg's own connection under a connection checked out of ``engine``'s pool (so
    with its URL, TLS settings and pre-ping), for statements run without SQLAlchemy.

    No transaction is open on it (the check-out begins none): a single statement commits
    on its own, as does an ``executemany``. Returned to the pool on exit.
    """
    async with engine.connect() as conn:
        yield (await conn.get_raw_connection()).driver_connection


def set_sqlite_pragmas(dbapi_connection: Any, _record: Any = None) -> None:
    """The settings of every SQLite connection (the engine's, and the ledger inserter's).

    WAL lets readers (reports) run beside the ledger writer; busy_timeout makes a second
    process wait for the write lock instead of failing at once.
    """
    enable_wal(dbapi_connection, busy_timeout_ms=10_000)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engine(config: DatabaseConfig | str) -> AsyncEngine:
    """An async engine for ``config.url`` (a ``DatabaseConfig`` or a bare URL).

    SQLite files get WAL mode and their parent folder is created; PostgreSQL
    connections are checked before use so that a database restart costs one retry,
    not a stream of errors.
    """
    if isinstance(config, str):
        config = DatabaseConfig(url=config)
    try:
        url = make_url(config.url)
    except Exception as exc:
        raise ConfigError(f"config: accounting.database.url is not a database URL: {exc}") from exc
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.drivername != "sqlite+aiosqlite":
            url = url.set(drivername="sqlite+aiosqlite")
        if url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, echo=config.echo)
        event.listen(engine.sync_engine, "connect", set_sqlite_pragmas)
        return engine
    if backend == "postgresql":
        if url.drivername != "postgresql+asyncpg":
            url = url.set(drivername="postgresql+asyncpg")
        return create_async_engine(
            url, echo=config.echo, pool_size=config.pool_size, pool_pre_ping=True, pool_recycle=1800
        )
    raise ConfigError(
        f"config: accounting.database.url: unsupported database {backend!r} (use sqlite or postgresql)"
    )
