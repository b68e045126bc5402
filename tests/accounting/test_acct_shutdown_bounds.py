"""Shutdown is bounded by ``ledger.shutdown_timeout`` even when the database stops
answering mid-write (the rows stay in the journal for the next start), and PostgreSQL
connections have a connect timeout, a statement timeout and a bounded close.

Before: ``LedgerWriter.stop()`` waited for a hung write for good (shielded), asyncpg's
connect waited 60 s, and a connection's close waited for a server that never answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from sqlalchemy import text

from llmrouter.accounting import Accounting
from llmrouter.accounting.config import LedgerConfig
from llmrouter.accounting.db import CLOSE_TIMEOUT, COMMAND_TIMEOUT, CONNECT_TIMEOUT, create_engine
from llmrouter.accounting.entry import LedgerEntry
from llmrouter.errors import ConfigError, one_line_cause

from .conftest import chat_context, finish, make_config, needs_pg
from .test_acct_db_timeout import FreezableProxy, _through, proxy  # noqa: F401 - the fixture

pytestmark = pytest.mark.anyio

SHUTDOWN_TIMEOUT = 0.5


async def _serve_one(acct: Accounting) -> str:
    ctx = chat_context(max_cost=0.001)
    await acct.hooks.before_request(ctx)
    await acct.hooks.after_request(finish(ctx, cost=0.0001))
    return ctx.request_id


async def _closed_within(acct: Accounting, seconds: float) -> float:
    """``acct.aclose()``, which must return within ``seconds``; how long it took."""
    started = time.monotonic()
    closing = asyncio.get_running_loop().create_task(acct.aclose())
    done, _ = await asyncio.wait({closing}, timeout=seconds + 5)
    took = time.monotonic() - started
    if not done:
        closing.cancel()
    assert done, f"aclose() still running after {took:.1f}s"
    closing.result()
    assert took < seconds, took
    return took


def _config(db_url: str, tmp_path: Path) -> object:
    ledger = LedgerConfig(
        journal_dir=str(tmp_path / "journal"), flush_interval=0.02, shutdown_timeout=SHUTDOWN_TIMEOUT
    )
    return make_config(db_url, tmp_path, ledger=ledger)


async def _ledger_ids(db_url: str) -> list[str]:
    engine = create_engine(db_url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(text("SELECT request_id FROM llmr_ledger"))).scalars())
    finally:
        await engine.dispose()


async def test_a_write_that_hangs_holds_the_shutdown_no_longer_than_shutdown_timeout(
    sqlite_url: str, tmp_path: Path
) -> None:
    hanging = True
    entered = anyio.Event()

    async def sink(rows: Sequence[LedgerEntry]) -> None:
        from llmrouter.accounting.ledger import insert_rows

        if hanging:
            entered.set()
            await anyio.sleep_forever()  # a database that accepted the statement, then went silent
        await insert_rows(acct.engine, rows)

    acct = Accounting(_config(sqlite_url, tmp_path), ledger_sink=sink)  # type: ignore[arg-type]
    await acct.start()
    request_id = await _serve_one(acct)
    with anyio.fail_after(5):
        await entered.wait()
    await _closed_within(acct, SHUTDOWN_TIMEOUT + 1.0)
    assert "shutdown_timeout" in (acct.ledger.last_error or "")
    # The row stayed in the journal: the next start writes it.
    hanging = False
    acct = Accounting(_config(sqlite_url, tmp_path), ledger_sink=sink)  # type: ignore[arg-type]
    async with acct:
        pass
    assert await _ledger_ids(sqlite_url) == [request_id]


async def test_a_flush_that_hangs_at_shutdown_is_bounded_too(sqlite_url: str, tmp_path: Path) -> None:
    # The writer's last write failed fast (it is not stuck); the final flush then hangs.
    calls = 0

    async def sink(rows: Sequence[LedgerEntry]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError("connection lost")
        await anyio.sleep_forever()

    acct = Accounting(_config(sqlite_url, tmp_path), ledger_sink=sink)  # type: ignore[arg-type]
    await acct.start()
    await _serve_one(acct)
    with anyio.fail_after(5):
        while not acct.ledger.failures:  # noqa: ASYNC110 - a counter, no event
            await anyio.sleep(0.01)
    await _closed_within(acct, SHUTDOWN_TIMEOUT + 1.0)
    assert acct.ledger.pending == 1
    assert list((tmp_path / "journal").iterdir())  # kept for the next start


@pytest.mark.parametrize("pg", [pytest.param("pg", marks=needs_pg)])
async def test_shutdown_with_postgresql_frozen_mid_run_keeps_the_rows_in_the_journal(
    pg: str,
    pg_url: str,
    tmp_path: Path,
    proxy: FreezableProxy,  # noqa: F811 - the fixture
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = _config(_through(pg_url, proxy), tmp_path)
    acct = Accounting(config)  # type: ignore[arg-type]
    await acct.start()
    first = await _serve_one(acct)
    await acct.ledger.flush()
    proxy.freeze()  # a network partition: nothing moves, no connection is refused
    second = await _serve_one(acct)
    await anyio.sleep(0.2)  # the writer is in its insert now, waiting for an answer
    caplog.set_level(logging.ERROR)
    # shutdown_timeout for the ledger, CLOSE_TIMEOUT for the connections it closes.
    await _closed_within(acct, SHUTDOWN_TIMEOUT + CLOSE_TIMEOUT + 1.5)
    assert acct.ledger.pending == 1
    # A connection's close timed out quietly: it was dropped, not logged as a failure.
    assert not [r for r in caplog.records if "Exception closing connection" in r.getMessage()]
    proxy.thaw()
    async with Accounting(make_config(pg_url, tmp_path)):  # the next start replays the journal
        pass
    assert sorted(await _ledger_ids(pg_url)) == sorted([first, second])


async def test_connecting_to_a_server_that_does_not_answer_times_out_saying_where(silent_server: int) -> None:
    engine = create_engine(
        f"postgresql+asyncpg://llmrouter:secret@127.0.0.1:{silent_server}/ledger"
        "?connect_timeout=0.5&password=also-secret&ssl=disable"
    )
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError) as raised:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    assert time.monotonic() - started < 3
    message = (
        f"timed out connecting to postgresql://llmrouter:***@127.0.0.1:{silent_server}/ledger after 0.5 s"
    )
    assert str(raised.value) == message  # neither password: the query is left out
    # Not the CancelledError under asyncpg's timeout (it said "CancelledError").
    assert one_line_cause(raised.value) == f"TimeoutError: {message}"


def test_postgresql_timeout_parameters_are_taken_out_of_the_url() -> None:
    assert (CONNECT_TIMEOUT, COMMAND_TIMEOUT) == (10.0, 300.0)
    url = "postgresql+asyncpg://u@db/x?connect_timeout=3&command_timeout=0&prepared_statement_cache_size=50"
    engine = create_engine(url)
    # asyncpg would refuse them as arguments; the others pass through.
    assert dict(engine.url.query) == {"prepared_statement_cache_size": "50"}
    for bad in ("connect_timeout=0", "connect_timeout=x", "command_timeout=-1", "command_timeout=inf"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            create_engine(f"postgresql+asyncpg://u@db/x?{bad}")


@pytest.mark.parametrize("pg", [pytest.param("pg", marks=needs_pg)])
async def test_statements_have_a_timeout(pg: str, pg_url: str) -> None:
    engine = create_engine(f"{pg_url}?command_timeout=0.3")
    try:
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            assert raw._config.command_timeout == 0.3
            with pytest.raises(TimeoutError):
                await conn.execute(text("SELECT pg_sleep(2)"))
    finally:
        await engine.dispose()
    for url, expected in ((pg_url, COMMAND_TIMEOUT), (f"{pg_url}?command_timeout=0", None)):
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                raw = (await conn.get_raw_connection()).driver_connection
                assert raw is not None
                assert raw._config.command_timeout == expected
        finally:
            await engine.dispose()


async def test_a_sqlite_folder_that_cannot_be_made_fails_at_connect_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    engine = create_engine(
        f"sqlite+aiosqlite:///{blocker}/sub/x.db"
    )  # before: raised here, a traceback out of serve
    try:
        with pytest.raises(OSError) as raised:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    assert f"cannot create the SQLite database's folder {blocker}/sub" in one_line_cause(raised.value)
