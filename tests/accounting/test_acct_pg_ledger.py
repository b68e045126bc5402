"""The PostgreSQL ledger insert (asyncpg's executemany) behind LedgerWriter, on the local server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from sqlalchemy import exc as sa

from llmrouter.accounting import Accounting
from llmrouter.accounting.db import create_engine
from llmrouter.accounting.entry import FIELDS, as_entry
from llmrouter.accounting.ledger import LedgerWriter, refused_data
from llmrouter.accounting.pg_ledger import PostgresInserter

from .conftest import make_config, needs_pg
from .test_acct_sqlite_ledger import ledger_row, read_rows

pytestmark = [pytest.mark.anyio, *needs_pg]


async def test_rows_round_trip_and_a_replayed_batch_is_not_billed_twice(pg_url: str, tmp_path: Path) -> None:
    async with Accounting(make_config(pg_url, tmp_path)) as acct:
        writer: LedgerWriter = acct.ledger
        assert writer._sink.__name__ == "postgres_sink"
        rows = [ledger_row(request_id=f"r{i}") for i in range(3)]
        rows[1]["entry_id"] = rows[0]["entry_id"]  # repeated within one batch: stored once
        for row in rows:
            writer.record(dict(row))
        await writer.flush()
        await writer._sink([as_entry(row) for row in rows])  # the same entry ids again (a replay)
        stored = await read_rows(acct)
    assert [r["request_id"] for r in stored] == ["r0", "r2"]
    first = stored[0]
    assert (
        first["cost"] == 0.000125 and first["created_at"] == 1_767_225_600.5 and first["latency_ms"] == 12.5
    )
    assert first["stream"] is True and first["usage_estimated"] is True and first["cached_tokens"] == 0
    assert first["api_key_id"] is None and first["ttft_ms"] is None


def values(**changes: Any) -> tuple[Any, ...]:
    """A whole row's values, in column order."""
    return msgspec.structs.astuple(as_entry(ledger_row(**changes)))


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"attempts": "1"}, sa.DataError),  # a type asyncpg cannot encode (the fit leaves it)
        ({"stream": 1}, sa.DataError),  # not a bool
        ({"request_id": None}, sa.IntegrityError),  # NOT NULL
    ],
)
async def test_refused_rows_raise_what_sqlalchemy_raised(
    pg_url: str, tmp_path: Path, changes: dict[str, Any], error: type[Exception]
) -> None:
    async with Accounting(make_config(pg_url, tmp_path)) as acct:
        inserter = PostgresInserter(acct.engine, "llmr_ledger", FIELDS)
        with pytest.raises(error) as info:
            await inserter([values(), values(**changes)])
        assert refused_data(info.value)
        assert await read_rows(acct) == []  # the batch is one transaction: nothing written


async def test_a_refused_row_is_set_aside_and_the_rest_of_its_batch_is_written(
    pg_url: str, tmp_path: Path
) -> None:
    async with Accounting(make_config(pg_url, tmp_path)) as acct:
        writer: LedgerWriter = acct.ledger
        for i in range(5):
            writer.record(ledger_row(request_id=f"r{i}", attempts="x" if i == 2 else 1))
        await writer.flush()
        assert writer.rejected == 1 and writer.pending == 0 and writer.failures == 0
        assert [r["request_id"] for r in await read_rows(acct)] == ["r0", "r1", "r3", "r4"]
    rejected = (tmp_path / "journal" / "rejected.jsonl").read_text()
    assert '"request_id": "r2"' in rejected and "DataError" in rejected


async def test_an_unreachable_database_is_retried_not_refused(pg_url: str) -> None:
    engine = create_engine(pg_url.replace("127.0.0.1:5432", "127.0.0.1:1"))  # nothing listens there
    try:
        with anyio.fail_after(20), pytest.raises(Exception) as info:
            await PostgresInserter(engine, "llmr_ledger", FIELDS)([values()])
        assert not refused_data(info.value)
    finally:
        await engine.dispose()
