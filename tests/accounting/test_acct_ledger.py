"""The ledger: written behind the response, batched, flushed on shutdown, never losing an
acknowledged row (database outages, ambiguous failures, a process killed outright)."""

from __future__ import annotations

import errno
import sqlite3
import textwrap
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import text

from llmrouter.accounting import Accounting
from llmrouter.accounting.config import LedgerConfig
from llmrouter.accounting.entry import LedgerEntry, utc_day
from llmrouter.accounting.ledger import insert_rows

from .conftest import chat_context, finish, make_config, needs_pg, run_killed

pytestmark = pytest.mark.anyio


async def _rows(acct: Accounting) -> list[dict[str, Any]]:
    async with acct.engine.connect() as conn:
        result = await conn.execute(text("SELECT * FROM llmr_ledger ORDER BY created_at"))
        return [dict(r) for r in result.mappings().all()]


async def _serve(acct: Accounting, n: int, **finish_kwargs: Any) -> list[str]:
    ids = []
    for _ in range(n):
        ctx = chat_context(max_cost=0.001)
        await acct.hooks.before_request(ctx)
        await acct.hooks.after_request(finish(ctx, cost=0.0001, **finish_kwargs))
        ids.append(ctx.request_id)
    return ids


async def test_row_fields_and_write_behind(db_url: str, tmp_path: Path) -> None:
    gate = anyio.Event()
    calls: list[int] = []

    async def slow_sink(rows: Sequence[LedgerEntry]) -> None:
        calls.append(len(rows))
        await gate.wait()  # the database is slow: responses must not wait for it
        await insert_rows(acct.engine, rows)

    acct = Accounting(make_config(db_url, tmp_path), ledger_sink=slow_sink)
    async with acct:
        with anyio.fail_after(5):  # after_request returns while the writer is stuck
            ids = await _serve(acct, 5, prompt=11, completion=22, estimated=True)
            while not calls:  # noqa: ASYNC110 - polling a plain list the sink appends to
                await anyio.sleep(0.01)
            ids += await _serve(acct, 3)
        assert acct.ledger.pending == 8
        gate.set()
        await acct.ledger.flush()
        rows = await _rows(acct)
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    first = next(r for r in rows if r["request_id"] == ids[0])
    assert first["prompt_tokens"] == 11 and first["completion_tokens"] == 22
    assert first["usage_estimated"] in (True, 1) and first["cost"] == pytest.approx(0.0001)
    assert first["provider"] == "openai" and first["deployment"] == "openai/gpt-4o"
    assert first["model_group"] == "gpt-4o" and first["status"] == "ok"
    assert first["latency_ms"] is not None and first["day"] == first["day"][:10]


async def test_flush_on_shutdown_writes_everything(db_url: str, tmp_path: Path) -> None:
    config = make_config(
        db_url,
        tmp_path,
        ledger=LedgerConfig(journal_dir=str(tmp_path / "journal"), flush_interval=60, batch_size=1000),
    )
    async with Accounting(config) as acct:
        ids = await _serve(acct, 250)
        assert acct.ledger.pending == 250  # nothing written yet: the interval is a minute
    async with Accounting(config) as again:
        assert len(await _rows(again)) == 250
    assert not any((tmp_path / "journal").iterdir())  # every journal folder was cleaned up
    assert ids


async def test_a_full_batch_is_written_alone_and_the_rows_behind_it_wait(
    sqlite_url: str, tmp_path: Path
) -> None:
    # Rows that arrive while a full batch is being written wait for the next full batch
    # (or the interval, or a flush): written as they trickle in, each handful cost a
    # thread hop and a commit.
    gate = anyio.Event()
    sizes: list[int] = []

    async def sink(rows: Sequence[LedgerEntry]) -> None:
        sizes.append(len(rows))
        await gate.wait()
        await insert_rows(acct.engine, rows)

    ledger = LedgerConfig(journal_dir=str(tmp_path / "journal"), flush_interval=60, batch_size=4)
    acct = Accounting(make_config(sqlite_url, tmp_path, ledger=ledger), ledger_sink=sink)
    async with acct:
        with anyio.fail_after(10):
            ids = await _serve(acct, 4)
            while not sizes:  # noqa: ASYNC110 - polling a plain list the sink appends to
                await anyio.sleep(0.01)
            ids += await _serve(acct, 2)  # during the write
            gate.set()
            while acct.ledger.pending > 2:  # noqa: ASYNC110 - the writer exposes a count, not an event
                await anyio.sleep(0.01)
            await anyio.sleep(0.2)
            assert sizes == [4] and acct.ledger.pending == 2
            ids += await _serve(acct, 2)  # a full batch again
            while acct.ledger.pending:  # noqa: ASYNC110 - the writer exposes a count, not an event
                await anyio.sleep(0.01)
            assert sizes == [4, 4]
            ids += await _serve(acct, 1)
            await acct.ledger.flush()  # writes what is queued, full batch or not
        assert sizes == [4, 4, 1]
        assert sorted(r["request_id"] for r in await _rows(acct)) == sorted(ids)


async def test_database_outage_rows_kept_and_retried_without_duplicates(
    sqlite_url: str, tmp_path: Path
) -> None:
    failures = {"left": 3}

    async def flaky(rows: Sequence[LedgerEntry]) -> None:
        if failures["left"] > 0:
            failures["left"] -= 1
            if failures["left"] == 0:
                # ambiguous: the rows were committed, but the acknowledgement was lost
                await insert_rows(acct.engine, rows)
            raise ConnectionError("database went away")
        await insert_rows(acct.engine, rows)

    acct = Accounting(make_config(sqlite_url, tmp_path), ledger_sink=flaky)
    async with acct:
        ids = await _serve(acct, 40)
        with anyio.fail_after(20):
            while acct.ledger.pending:  # noqa: ASYNC110 - the writer exposes a count, not an event
                await anyio.sleep(0.05)
        assert acct.ledger.failures == 3 and "database went away" in acct.ledger.last_error
        rows = await _rows(acct)
    assert sorted(r["request_id"] for r in rows) == sorted(ids)  # each exactly once


async def test_shutdown_during_outage_leaves_rows_for_the_next_start(sqlite_url: str, tmp_path: Path) -> None:
    async def down(rows: Sequence[LedgerEntry]) -> None:
        raise ConnectionError("database is down")

    ledger = LedgerConfig(journal_dir=str(tmp_path / "journal"), flush_interval=0.02, shutdown_timeout=0.3)
    config = make_config(sqlite_url, tmp_path, ledger=ledger)
    async with Accounting(config, ledger_sink=down) as acct:
        ids = await _serve(acct, 25)
    async with Accounting(config) as restarted:  # the database is back
        rows = await _rows(restarted)
    assert sorted(r["request_id"] for r in rows) == sorted(ids)


def test_a_restarted_ledger_writes_its_rows(sqlite_url: str, tmp_path: Path) -> None:
    # Started, closed, started again in another event loop (an app's lifespan run twice,
    # as two `with TestClient(app)` blocks do): the second run's rows reach the database.
    journal = tmp_path / "journal"
    acct = Accounting(make_config(sqlite_url, tmp_path))
    ids: list[str] = []

    async def serve_once() -> None:
        async with acct:
            ids.extend(await _serve(acct, 3))
            with anyio.fail_after(10):  # by the writer in the background, not at shutdown
                while acct.ledger.pending:  # noqa: ASYNC110 - the writer exposes a count, not an event
                    await anyio.sleep(0.01)

    anyio.run(serve_once)
    anyio.run(serve_once)
    assert list(journal.iterdir()) == []  # written, not left for the next start to replay
    with closing(sqlite3.connect(tmp_path / "acct.db")) as db:
        written = [request_id for (request_id,) in db.execute("SELECT request_id FROM llmr_ledger")]
    assert sorted(written) == sorted(ids)


async def test_rows_a_stopped_run_left_are_written_once_after_a_restart(
    sqlite_url: str, tmp_path: Path
) -> None:
    database_up = False

    async def sink(rows: Sequence[LedgerEntry]) -> None:
        if not database_up:
            raise ConnectionError("database is down")
        await insert_rows(acct.engine, rows)

    ledger = LedgerConfig(journal_dir=str(tmp_path / "journal"), flush_interval=0.02, shutdown_timeout=0.3)
    acct = Accounting(make_config(sqlite_url, tmp_path, ledger=ledger), ledger_sink=sink)
    async with acct:
        ids = await _serve(acct, 5)
    assert acct.ledger.pending == 5  # left in the journal
    database_up = True
    async with acct:
        assert acct.ledger.pending == 0  # replayed from that journal, not queued twice
        ids += await _serve(acct, 2)
    assert acct.ledger.pending == 0
    async with Accounting(make_config(sqlite_url, tmp_path, ledger=ledger)) as again:
        rows = await _rows(again)
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert list((tmp_path / "journal").iterdir()) == []


_CRASH = textwrap.dedent(
    """
    import os, sys, anyio
    sys.path.insert(0, {tests!r})
    from llmrouter.accounting import Accounting
    from conftest import chat_context, finish, make_config
    from pathlib import Path

    async def main():
        acct = Accounting(make_config({url!r}, Path({tmp!r}), ledger=__import__(
            "llmrouter.accounting.config", fromlist=["LedgerConfig"]).LedgerConfig(
            journal_dir={journal!r}, flush_interval=3600, batch_size=10_000)))
        await acct.start()
        for i in range(30):
            ctx = chat_context(max_cost=0.001)
            ctx.request_id = f"crash-{{i}}"
            await acct.hooks.before_request(ctx)
            await acct.hooks.after_request(finish(ctx, cost=0.0001))
            if i == 19:
                # in the database, and still in the journal's current segment: the
                # restart replays these 20 again and must not bill them twice
                await acct.ledger.flush()
        print("acknowledged", acct.ledger.pending, flush=True)
        os._exit(9)  # killed: no shutdown, no flush

    anyio.run(main)
    """
)


async def test_rows_of_a_killed_process_are_replayed(sqlite_url: str, tmp_path: Path) -> None:
    journal = str(tmp_path / "journal")
    script = _CRASH.format(
        tests=str(Path(__file__).parent), url=sqlite_url, tmp=str(tmp_path), journal=journal
    )
    assert "acknowledged 10" in await run_killed(script, tmp_path)
    config = make_config(sqlite_url, tmp_path, ledger=LedgerConfig(journal_dir=journal))
    async with Accounting(config) as restarted:
        rows = await _rows(restarted)
    assert sorted(r["request_id"] for r in rows) == sorted(f"crash-{i}" for i in range(30))


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_pg)])
async def test_postgres_connections_killed_mid_run(pg_url: str, tmp_path: Path, _: int) -> None:
    """A database restart drops every connection: the writer reconnects and loses nothing."""
    async with Accounting(make_config(pg_url, tmp_path)) as acct:
        ids = await _serve(acct, 10)
        await acct.ledger.flush()
        name = pg_url.rsplit("/", 1)[1]
        async with acct.engine.connect() as conn:  # a separate session does the killing
            await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
        ids += await _serve(acct, 10)
        with anyio.fail_after(20):
            while acct.ledger.pending:  # noqa: ASYNC110 - the writer exposes a count, not an event
                await anyio.sleep(0.05)
        rows = await _rows(acct)
    assert sorted(r["request_id"] for r in rows) == sorted(ids)


async def test_partial_streams_are_billed_for_what_was_generated(acct: Accounting) -> None:
    ctx = chat_context(max_cost=0.001)
    ctx.stream = True
    await acct.hooks.before_request(ctx)
    # the client went away after 7 tokens; the router counted them and priced them
    await acct.hooks.after_request(
        finish(ctx, prompt=12, completion=7, cost=0.000026, status="cancelled", estimated=True)
    )
    errored = chat_context(max_cost=0.001)
    await acct.hooks.before_request(errored)
    await acct.hooks.after_request(finish(errored, prompt=12, completion=3, cost=0.000018, status="error"))
    await acct.ledger.flush()
    rows = {r["request_id"]: r for r in await _rows(acct)}
    cancelled = rows[ctx.request_id]
    assert cancelled["status"] == "cancelled" and cancelled["completion_tokens"] == 7
    assert cancelled["cost"] == pytest.approx(0.000026) and cancelled["stream"] in (True, 1)
    assert rows[errored.request_id]["cost"] == pytest.approx(0.000018)
    report = await acct.usage(by=["status"])
    assert {r["status"]: r["cost"] for r in report} == pytest.approx(
        {"cancelled": 0.000026, "error": 0.000018}
    )


async def test_rejected_requests_are_recorded_unbilled(acct: Accounting) -> None:
    from llmrouter.accounting.config import BudgetRule
    from llmrouter.errors import BudgetExceededError

    acct.budgets.rules = [BudgetRule(limit=0.0)]
    ctx = chat_context(max_cost=0.001)
    with pytest.raises(BudgetExceededError):
        await acct.hooks.before_request(ctx)
    await acct.ledger.flush()
    (row,) = await _rows(acct)
    assert row["status"] == "rejected" and row["error_code"] == "insufficient_quota" and row["cost"] == 0


async def test_a_row_the_database_refuses_is_set_aside_and_the_rest_are_written(
    sqlite_url: str, tmp_path: Path
) -> None:
    from sqlalchemy.exc import DataError

    async def picky(rows: Sequence[LedgerEntry]) -> None:
        # Like PostgreSQL refusing one value: the whole statement fails, nothing is written.
        if any(row.completion_tokens == 21 for row in rows):
            raise DataError("INSERT INTO llmr_ledger ...", {}, Exception("value out of range"))
        await insert_rows(acct.engine, rows)

    acct = Accounting(make_config(sqlite_url, tmp_path), ledger_sink=picky)
    async with acct:
        good = await _serve(acct, 3)
        (bad,) = await _serve(acct, 1, completion=21)
        good += await _serve(acct, 3)
        with anyio.fail_after(20):
            while acct.ledger.pending:  # noqa: ASYNC110 - the writer exposes a count, not an event
                await anyio.sleep(0.05)
        rows = await _rows(acct)
        assert acct.readiness()["ledger_rejected"] == 1
    assert sorted(r["request_id"] for r in rows) == sorted(good)
    assert acct.ledger.rejected == 1
    (line,) = (tmp_path / "journal" / "rejected.jsonl").read_text().splitlines()
    assert bad in line and "value out of range" in line


def test_utc_day_at_day_boundaries_and_back_and_forth() -> None:
    # The day is formatted once and reused: moving between days must still be right.
    midnight = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    expected = [
        (midnight - 0.001, "2025-12-31"),
        (midnight, "2026-01-01"),
        (midnight - 86_400.5, "2025-12-30"),
        (midnight + 86_399.999, "2026-01-01"),
        (midnight + 86_400, "2026-01-02"),
        (midnight - 0.001, "2025-12-31"),
        (0.0, "1970-01-01"),
        (-1.0, "1969-12-31"),
    ]
    assert [utc_day(ts) for ts, _ in expected] == [day for _, day in expected]


async def test_a_row_the_journal_cannot_take_still_reaches_the_database(
    acct: Accounting, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = acct.ledger._journal
    assert journal is not None

    def disk_full(row: dict[str, Any]) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal, "append", disk_full)
    ids = await _serve(acct, 3)
    await acct.ledger.flush()
    assert sorted(r["request_id"] for r in await _rows(acct)) == sorted(ids)
    assert acct.readiness()["ledger_unjournaled"] == 3
    assert not acct.ledger._open  # nor were their lines in flight: nothing to carry


def test_row_from_context_fills_every_field_from_the_context() -> None:
    # The row is built positionally (keywords cost msgspec five times as much): each
    # field must still get its own value. Every value here is distinct.
    from llmrouter.accounting.ledger import row_from_context
    from llmrouter.context import RequestContext
    from llmrouter.errors import UpstreamError
    from llmrouter.types import PromptTokensDetails, Usage

    ctx = RequestContext(
        request_id="req-7",
        api_key_id="key-1",
        operation="completion",
        stream=True,
        model_group="group",
        deployment="dep",
        provider="prov",
        upstream_model="up-model",
        attempts=3,
        usage=Usage(
            prompt_tokens=11,
            completion_tokens=22,
            total_tokens=33,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=5),
            estimated=True,
        ),
        cost=0.25,
        cost_source="price_table",
        cache_status="miss",
        status="error",
        error=UpstreamError("boom", code="upstream_failed"),
        started_at=100.0,
        first_token_at=100.5,
        finished_at=101.0,
        created=1_767_225_600.5,
    )
    row = row_from_context(ctx)
    assert len(row.entry_id) == 32
    assert row == LedgerEntry(
        entry_id=row.entry_id,
        request_id="req-7",
        created_at=1_767_225_600.5,
        day="2026-01-01",
        api_key_id="key-1",
        operation="completion",
        stream=True,
        model_group="group",
        deployment="dep",
        provider="prov",
        upstream_model="up-model",
        prompt_tokens=11,
        completion_tokens=22,
        cached_tokens=5,
        cost=0.25,
        cost_source="price_table",
        usage_estimated=True,
        cache_status="miss",
        latency_ms=1000.0,
        ttft_ms=500.0,
        status="error",
        error_code="upstream_failed",
        attempts=3,
    )
    rejected = row_from_context(ctx, status="rejected", error_code="rate_limit_exceeded")
    assert (rejected.status, rejected.error_code) == ("rejected", "rate_limit_exceeded")
