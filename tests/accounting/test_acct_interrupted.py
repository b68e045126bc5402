"""Requests a process does not finish are billed: a process killed mid-request, or one
shut down without waiting for them, leaves an ``interrupted`` ledger row for each, at its
estimated prompt cost, and its budget reservation settled to that cost."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from sqlalchemy import text

from llmrouter.accounting import Accounting
from llmrouter.accounting.budgets import to_units
from llmrouter.accounting.config import (
    AccountingConfig,
    BudgetRule,
    DatabaseConfig,
    LedgerConfig,
    LimitsConfig,
    RedisConfig,
)

from .conftest import (
    REDIS_URL,
    _redis_client,
    chat_context,
    finish,
    killed_script,
    needs_pg,
    needs_redis,
    run_killed,
)

pytestmark = pytest.mark.anyio

MAX_COST, PROMPT_COST, COST = 0.01, 0.002, 0.003


def _config(db_url: str, tmp_path: Path, backend: str, redis_prefix: str | None) -> AccountingConfig:
    return AccountingConfig(
        database=DatabaseConfig(url=db_url),
        ledger=LedgerConfig(journal_dir=str(tmp_path / "journal"), flush_interval=0.02),
        budget_backend=backend,  # type: ignore[arg-type]
        budgets=[BudgetRule(limit=1.0, period="month")],
        redis=RedisConfig(url=REDIS_URL if redis_prefix else None, prefix=redis_prefix or "llmrouter:"),
    )


def _context(request_id: str) -> Any:
    ctx = chat_context(max_cost=MAX_COST, prompt_tokens=1000, user="customer-7")
    ctx.request_id = request_id
    ctx.prompt_cost_estimate = PROMPT_COST
    return ctx


_KILLED = """
    async def main():
        acct = await started()
        for i in range(5):
            ctx = _context(f"run-{i}")
            await acct.hooks.before_request(ctx)
            if i < 3:
                await acct.hooks.after_request(finish(ctx, cost=COST))
        await acct.ledger.flush()
        print("in flight", acct.hooks.in_flight, flush=True)
        os._exit(9)  # killed with two requests running
"""


async def _rows(acct: Accounting) -> dict[str, dict[str, Any]]:
    async with acct.engine.connect() as conn:
        result = await conn.execute(text("SELECT * FROM llmr_ledger"))
        return {row["request_id"]: dict(row) for row in result.mappings().all()}


async def _budget(acct: Accounting) -> tuple[int, int]:
    assert acct.budgets is not None
    (window,) = acct.budgets.windows_for(None, "gpt-4o")
    return await acct.budgets.store.usage(window)


def _assert_interrupted(row: dict[str, Any], error_code: str) -> None:
    assert row["status"] == "interrupted"
    assert row["error_code"] == error_code
    assert (row["prompt_tokens"], row["completion_tokens"]) == (1000, 0)
    assert row["cost"] == pytest.approx(PROMPT_COST)
    assert row["cost_source"] == "price_table"
    assert row["usage_estimated"]
    assert row["end_user"] == "customer-7"


EVERY_STORE = pytest.mark.parametrize(
    ("db", "backend"),
    [
        ("sqlite", "memory"),
        ("sqlite", "database"),
        pytest.param("sqlite", "redis", marks=needs_redis),
        pytest.param("postgres", "database", marks=needs_pg),
    ],
)
"""The ledger's databases, with each budget store."""


async def config_on(
    stack: contextlib.AsyncExitStack, db: str, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AccountingConfig:
    """The accounting config on ``db``, budgets in ``backend`` (Redis: under a prefix of
    its own, removed as ``stack`` closes)."""
    prefix = (await stack.enter_async_context(_redis_client())).test_prefix if backend == "redis" else None
    url = request.getfixturevalue("sqlite_url" if db == "sqlite" else "pg_url")
    return _config(url, tmp_path, backend, prefix)


@EVERY_STORE
async def test_requests_of_a_killed_process_are_billed_as_interrupted(
    db: str, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await _kill_and_restart(await config_on(stack, db, backend, tmp_path, request), tmp_path)


async def _kill_and_restart(config: AccountingConfig, tmp_path: Path) -> None:
    config = msgspec.structs.replace(config, limits=LimitsConfig(concurrency=2))
    assert "in flight 2" in await run_killed(killed_script(_KILLED, config), tmp_path)

    async with Accounting(config) as restarted:
        rows = await _rows(restarted)
        spent, reserved = await _budget(restarted)
        # The two concurrency slots the dead process held are free again (in Redis they
        # were held until their leases ended, 15 minutes).
        for name in ("next-1", "next-2"):
            await restarted.hooks.before_request(_context(name))
    assert sorted(rows) == [f"run-{i}" for i in range(5)]
    for i in range(3):
        assert (rows[f"run-{i}"]["status"], rows[f"run-{i}"]["cost"]) == ("ok", pytest.approx(COST))
    for i in (3, 4):
        _assert_interrupted(rows[f"run-{i}"], "process_exited")
    # The dead process's reservations became what the ledger billed, at once: not left
    # reserved until their leases end (15 minutes), nor given back unbilled.
    assert (spent, reserved) == (to_units(3 * COST + 2 * PROMPT_COST), 0)


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=needs_pg)])
async def test_requests_still_running_at_shutdown_are_billed_as_interrupted(
    db: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("sqlite_url" if db == "sqlite" else "pg_url")
    config = _config(url, tmp_path, "database", None)
    async with Accounting(config) as acct:
        finished = _context("finished")
        await acct.hooks.before_request(finished)
        await acct.hooks.after_request(finish(finished, cost=COST))
        for name in ("running-1", "running-2"):  # a forced shutdown does not wait for these
            await acct.hooks.before_request(_context(name))
        # One ends as the shutdown closes the ledger (cancelled, it unwinds): its own row.
        unwinding = _context("unwinding")
        await acct.hooks.before_request(unwinding)

        async def unwind() -> None:
            await anyio.sleep(0.2)
            await acct.hooks.after_request(finish(unwinding, cost=COST, status="cancelled"))

        task = asyncio.get_running_loop().create_task(unwind())
    await task
    async with Accounting(config) as restarted:
        rows = await _rows(restarted)
        spent, reserved = await _budget(restarted)
    assert sorted(rows) == ["finished", "running-1", "running-2", "unwinding"]
    _assert_interrupted(rows["running-1"], "shutdown")
    _assert_interrupted(rows["running-2"], "shutdown")
    assert (rows["unwinding"]["status"], rows["unwinding"]["cost"]) == ("cancelled", pytest.approx(COST))
    assert (spent, reserved) == (to_units(2 * COST + 2 * PROMPT_COST), 0)
    assert not list((tmp_path / "journal").iterdir())  # nothing left to replay


async def test_a_request_in_flight_for_many_segments_keeps_its_line_and_no_more(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Its journal line is copied forward as segments are dropped: a request running for
    an hour neither keeps an hour of segments nor loses its line."""
    config = msgspec.structs.replace(_config(sqlite_url, tmp_path, "memory", None), budgets=[])
    acct = Accounting(config)
    await acct.start()
    await acct.hooks.before_request(_context("long"))
    for i in range(8000):  # ~5 MB of journal lines: five segments of 1 MiB
        ctx = _context(f"short-{i}")
        await acct.hooks.before_request(ctx)
        await acct.hooks.after_request(finish(ctx, cost=COST))
    await acct.ledger.flush()
    journal = acct.ledger._journal
    assert journal is not None and journal.segment >= 4
    assert len(list(journal.folder.glob("*.jsonl"))) <= 2  # segment 0, where "long" began, is gone
    journal.close(committed=False)  # the process dies: its folder is left for the next start
    await acct.engine.dispose()

    async with Accounting(config) as restarted:
        rows = await _rows(restarted)
    assert len(rows) == 8001
    _assert_interrupted(rows["long"], "process_exited")
