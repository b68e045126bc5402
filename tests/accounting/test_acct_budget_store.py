"""The database budget store's counters, the same on SQLite (through SQLAlchemy) and on
PostgreSQL (asyncpg's connection directly): reserve, refuse, settle."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmrouter.accounting import Accounting
from llmrouter.accounting.budget_stores import DatabaseBudgetStore
from llmrouter.accounting.budgets import BudgetWindow

from .conftest import make_config

pytestmark = pytest.mark.anyio


def window(counter: str = "key-1:total", limit: int = 1_000) -> BudgetWindow:
    return BudgetWindow(
        counter=counter,
        key_id="key-1",
        model=None,
        period="total",
        start=0.0,
        end=None,
        limit=limit,
        soft_limit=None,
    )


async def test_reserve_refuse_and_settle(db_url: str, tmp_path: Path) -> None:
    async def seed(_: BudgetWindow) -> int:
        return 300  # what the ledger says was spent before the counter existed

    async with Accounting(make_config(db_url, tmp_path)) as acct:
        store = DatabaseBudgetStore(acct.engine, seed)
        budget = window()
        assert await store.reserve(budget, 600, "r1") == (True, 300, 600)
        assert await store.reserve(budget, 101, "r2") == (False, 300, 600)  # 300 + 600 + 101 > 1,000
        assert await store.reserve(budget, 100, "r3") == (True, 300, 700)  # exactly the limit
        assert await store.reserve(budget, 0, "r4") == (False, 300, 700)  # nothing left: not even a free one
        assert await store.settle(budget, 600, 250, "r1") == 550  # spent 250 of the 600 reserved
        assert await store.usage(budget) == (550, 100)
        assert await store.reserve(budget, 0, "r5") == (True, 550, 100)  # under the limit again
        assert await store.settle(budget, 100, 100, "r3") == 650
        assert await store.usage(budget) == (650, 0)


async def test_two_stores_share_the_counters(db_url: str, tmp_path: Path) -> None:
    async def seed(_: BudgetWindow) -> int:
        return 0

    async with Accounting(make_config(db_url, tmp_path)) as acct:
        one, two = DatabaseBudgetStore(acct.engine, seed), DatabaseBudgetStore(acct.engine, seed)
        budget = window(limit=100)
        assert (await one.reserve(budget, 60, "a"))[0]
        assert not (await two.reserve(budget, 60, "b"))[0]  # the other replica's reservation counts
        await one.settle(budget, 60, 10, "a")
        assert await two.reserve(budget, 60, "b") == (True, 10, 60)
