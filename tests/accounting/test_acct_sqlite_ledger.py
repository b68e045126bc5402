"""The SQLite ledger insert (plain sqlite3 in a worker thread) behind LedgerWriter."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import text

from llmrouter.accounting import Accounting
from llmrouter.accounting.entry import as_entry
from llmrouter.accounting.ledger import LedgerWriter
from llmrouter.accounting.sqlite_ledger import ROWS_PER_STATEMENT, is_refused

from .conftest import make_config

pytestmark = pytest.mark.anyio


def ledger_row(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "entry_id": uuid.uuid4().hex,
        "request_id": uuid.uuid4().hex,
        "created_at": 1_767_225_600.5,
        "day": "2026-01-01",
        "operation": "chat",
        "stream": True,
        "model_group": "m",
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "cost": 0.000125,
        "usage_estimated": True,
        "latency_ms": 12.5,
        "status": "ok",
        "attempts": 1,
    }
    row.update(changes)
    return row


async def read_rows(acct: Accounting) -> list[dict[str, Any]]:
    async with acct.engine.connect() as conn:
        result = await conn.execute(text("SELECT * FROM llmr_ledger ORDER BY request_id"))
        return [dict(r) for r in result.mappings().all()]


async def test_rows_round_trip_and_a_replayed_batch_is_not_billed_twice(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        writer: LedgerWriter = acct.ledger
        rows = [ledger_row(request_id=f"r{i}") for i in range(3)]
        for row in rows:
            writer.record(dict(row))
        await writer.flush()
        await writer._sink([as_entry(row) for row in rows])  # the same entry ids again (a replay)
        stored = await read_rows(acct)
    assert [r["request_id"] for r in stored] == ["r0", "r1", "r2"]
    first = stored[0]
    assert (
        first["cost"] == 0.000125 and first["created_at"] == 1_767_225_600.5 and first["latency_ms"] == 12.5
    )
    assert first["stream"] == 1 and first["usage_estimated"] == 1 and first["cached_tokens"] == 0
    assert first["api_key_id"] is None and first["ttft_ms"] is None


async def test_a_batch_of_several_statements_round_trips_and_skips_repeated_entries(
    sqlite_url: str, tmp_path: Path
) -> None:
    # Two statements of ROWS_PER_STATEMENT rows each, then three rows one by one; an
    # entry id repeated inside the first statement is stored once.
    rows = [ledger_row(request_id=f"r{i:03d}", prompt_tokens=i) for i in range(2 * ROWS_PER_STATEMENT + 3)]
    rows[7]["entry_id"] = rows[3]["entry_id"]
    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        await acct.ledger._sink([as_entry(row) for row in rows])
        stored = await read_rows(acct)
    expected = [row for i, row in enumerate(rows) if i != 7]
    assert [r["request_id"] for r in stored] == [row["request_id"] for row in expected]
    assert [(r["entry_id"], r["prompt_tokens"]) for r in stored] == [
        (row["entry_id"], row["prompt_tokens"]) for row in expected
    ]
    assert all(r["cost"] == 0.000125 and r["api_key_id"] is None for r in stored)


async def test_a_row_refused_inside_a_statement_of_many_rows_is_set_aside(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        for i in range(ROWS_PER_STATEMENT + 1):
            acct.ledger.record(ledger_row(request_id=None if i == 5 else f"r{i:03d}"))
        await acct.ledger.flush()
        with anyio.fail_after(20):
            while acct.ledger.pending:  # noqa: ASYNC110 - the writer exposes a count, not an event
                await anyio.sleep(0.02)
        stored = await read_rows(acct)
        assert acct.ledger.rejected == 1
    assert [r["request_id"] for r in stored] == [f"r{i:03d}" for i in range(ROWS_PER_STATEMENT + 1) if i != 5]


async def test_a_row_sqlite_refuses_is_set_aside_and_the_rest_are_written(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        acct.ledger.record(ledger_row(request_id="good-1"))
        acct.ledger.record(ledger_row(request_id=None))  # NOT NULL: refused by SQLite itself
        acct.ledger.record(ledger_row(request_id="good-2"))
        with anyio.fail_after(20):
            while acct.ledger.pending:  # noqa: ASYNC110 - the writer exposes a count, not an event
                await anyio.sleep(0.02)
        stored = await read_rows(acct)
        assert acct.ledger.rejected == 1
    assert [r["request_id"] for r in stored] == ["good-1", "good-2"]
    (line,) = (tmp_path / "journal" / "rejected.jsonl").read_text().splitlines()
    assert "IntegrityError" in line and "NOT NULL" in line


async def test_a_write_waits_for_another_writers_lock_and_is_not_set_aside(
    sqlite_url: str, tmp_path: Path
) -> None:
    import sqlite3

    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        blocker = sqlite3.connect(sqlite_url.split(":///", 1)[1], timeout=0)
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
        inserter = acct.ledger._sink
        try:
            with anyio.fail_after(30):
                acct.ledger.record(ledger_row(request_id="waits"))
                await anyio.sleep(0.1)
                assert acct.ledger.pending == 1
        finally:
            blocker.rollback()
            blocker.close()
        await acct.ledger.flush()
        assert acct.ledger.rejected == 0 and inserter is acct.ledger._sink
        assert [r["request_id"] for r in await read_rows(acct)] == ["waits"]
    # Had the lock outlived the busy timeout, the batch would have been retried later:
    assert not is_refused(sqlite3.OperationalError("database is locked"))
    assert is_refused(sqlite3.IntegrityError("NOT NULL constraint failed"))


async def test_none_and_bool_are_stored_as_sqlite_would_store_them(sqlite_url: str, tmp_path: Path) -> None:
    # The module registers adapters for None and bool (a shortcut past sqlite3's adapter
    # protocol): the stored values must be what sqlite3 stores without them.
    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        writer: LedgerWriter = acct.ledger
        writer.record(ledger_row(stream=True, usage_estimated=False, api_key_id=None, ttft_ms=None))
        await writer.flush()
        async with acct.engine.connect() as conn:
            stored = (
                await conn.execute(
                    text(
                        "SELECT stream, typeof(stream), usage_estimated, typeof(usage_estimated),"
                        " typeof(api_key_id), typeof(ttft_ms) FROM llmr_ledger"
                    )
                )
            ).one()
    assert tuple(stored) == (1, "integer", 0, "integer", "null", "null")
