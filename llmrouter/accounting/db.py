"""The async engine: SQLite through aiosqlite (WAL) by default, PostgreSQL through asyncpg."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from llmrouter.accounting.config import DatabaseConfig
from llmrouter.errors import ConfigError
from llmrouter.sqlite_wal import enable_wal

__all__ = [
    "CLOSE_TIMEOUT",
    "COMMAND_TIMEOUT",
    "CONNECT_TIMEOUT",
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


CONNECT_TIMEOUT = 10.0
"""Seconds a new PostgreSQL connection may take (TCP, TLS, authentication), unless the URL
says otherwise (``?connect_timeout=``): asyncpg's own default, 60 s, held a start-up (and
a stop asked for meanwhile) that long on a server that accepts connections but does not
answer."""

COMMAND_TIMEOUT = 300.0
"""Seconds a PostgreSQL statement may run, unless the URL says otherwise
(``?command_timeout=``, ``0`` for no bound): a statement on a connection that stopped
answering fails instead of holding its connection (and the ledger writer) for good. Far
above what the service's own statements take; a report over a very large ledger, or a
migration of one, may need more (``llmrouter db upgrade`` and ``llmrouter usage`` read
the same URL)."""

_TIMEOUT_PARAMETERS = ("connect_timeout", "command_timeout")


def create_engine(config: DatabaseConfig | str) -> AsyncEngine:
    """An async engine for ``config.url`` (a ``DatabaseConfig`` or a bare URL).

    SQLite files get WAL mode and their parent folder is created; PostgreSQL
    connections are checked before use so that a database restart costs one retry,
    not a stream of errors, and have a connect timeout (:data:`CONNECT_TIMEOUT`) and a
    statement timeout (:data:`COMMAND_TIMEOUT`), which the URL's ``connect_timeout`` and
    ``command_timeout`` parameters (seconds) change.

    Raises:
        ConfigError: not a database URL, an unsupported database, or a timeout parameter
            that is not a number of seconds.
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
        engine = create_async_engine(url, echo=config.echo)
        event.listen(engine.sync_engine, "connect", set_sqlite_pragmas)
        if url.database and url.database != ":memory:":
            _make_folder(engine, Path(url.database).expanduser().parent)
        return engine
    if backend == "postgresql":
        if url.drivername != "postgresql+asyncpg":
            url = url.set(drivername="postgresql+asyncpg")
        connect_timeout = _seconds(url, "connect_timeout", CONNECT_TIMEOUT, allow_none=False)
        command_timeout = _seconds(url, "command_timeout", COMMAND_TIMEOUT, allow_none=True)
        url = url.difference_update_query(_TIMEOUT_PARAMETERS)
        # Without the query: a password may be passed there too (`?password=`), and
        # render_as_string hides only the one in the user part.
        where = url.set(drivername="postgresql", query={}).render_as_string(hide_password=True)
        return create_async_engine(
            url,
            echo=config.echo,
            pool_size=config.pool_size,
            pool_pre_ping=True,
            pool_recycle=1800,
            connect_args={
                # SQLAlchemy's asyncpg adapter connects through this, with the URL's arguments.
                "async_creator_fn": _asyncpg_connect(where, connect_timeout),
                "command_timeout": command_timeout,
            },
        )
    raise ConfigError(
        f"config: accounting.database.url: unsupported database {backend!r} (use sqlite or postgresql)"
    )


def _make_folder(engine: AsyncEngine, folder: Path) -> None:
    """Create the SQLite file's folder now; when that fails, at each connection instead,
    so that the failure is the start-up's (one line: the path and the system's reason),
    not a traceback out of building the app."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:

        def make_folder(*_args: Any) -> None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise OSError(
                    exc.errno, f"cannot create the SQLite database's folder {folder}: {reason}"
                ) from None

        event.listen(engine.sync_engine, "do_connect", make_folder)


def _seconds(url: URL, name: str, default: float, *, allow_none: bool) -> float | None:
    """The URL's parameter ``name``, in seconds: ``default`` when absent; ``0`` for no
    bound where ``allow_none``."""
    raw = url.query.get(name)
    if raw is None:
        return default
    text = raw[-1] if isinstance(raw, tuple) else raw
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if seconds == 0 and allow_none:
        return None
    if not 0 < seconds < float("inf"):
        bound = "a number of seconds (0: no bound)" if allow_none else "a positive number of seconds"
        raise ConfigError(f"config: accounting.database.url: {name} must be {bound}, not {text!r}")
    return seconds


CLOSE_TIMEOUT = 2.0
"""Seconds closing a PostgreSQL connection may wait for the server's goodbye before the
connection is dropped (asyncpg waits for good, and at shutdown a server that stopped
answering held the process)."""


def _asyncpg_connect(where: str, seconds: float | None) -> Callable[..., Awaitable[Any]]:
    """``asyncpg.connect`` bounded to ``seconds``, its timeout saying what it connected
    to; its connections' ``close()`` bounded to :data:`CLOSE_TIMEOUT`."""
    import asyncpg

    class Connection(asyncpg.Connection):
        async def close(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - asyncpg's own
            try:
                await super().close(timeout=CLOSE_TIMEOUT if timeout is None else timeout)
            except TimeoutError:
                pass  # asyncpg dropped it: closed all the same

    async def connect(*args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncpg.connect(*args, timeout=seconds, connection_class=Connection, **kwargs)
        except TimeoutError as exc:
            raise TimeoutError(f"timed out connecting to {where} after {seconds:g} s") from exc

    return connect
