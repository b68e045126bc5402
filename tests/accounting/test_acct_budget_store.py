"""The database budget store's counters, the same on SQLite (through SQLAlchemy) and on
PostgreSQL (asyncpg's connection directly): reserve, refuse, settle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import text

from llmrouter.accounting import Accounting
from llmrouter.accounting.budget_stores import DatabaseBudgetStore, RedisBudgetStore
from llmrouter.accounting.budgets import BudgetManager, BudgetWindow, MemoryBudgetStore
from llmrouter.accounting.config import BudgetRule
from llmrouter.accounting.db import create_engine
from llmrouter.accounting.migrations import upgrade

from .conftest import drained, make_config, needs_redis

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


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def _nothing_spent(_: BudgetWindow) -> int:
    return 0


async def test_a_dead_replicas_reservation_is_freed_once_its_lease_ends(db_url: str, tmp_path: Path) -> None:
    clock = Clock()
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        dead = DatabaseBudgetStore(acct.engine, _nothing_spent, lease_seconds=60, clock=clock)
        alive = DatabaseBudgetStore(acct.engine, _nothing_spent, lease_seconds=60, clock=clock)
        budget = window(limit=1_000)
        assert (await dead.reserve(budget, 600, "crashed"))[0]  # its replica dies: never settled
        assert await alive.reserve(budget, 600, "a") == (False, 0, 600)
        clock.now += 59
        assert await alive.reserve(budget, 600, "a") == (False, 0, 600)  # the lease still holds
        clock.now += 2
        assert await alive.reserve(budget, 600, "a") == (True, 0, 600)  # freed, then reserved
        # The "dead" replica was only slow: its late settling counts the spend and gives
        # back nothing, for the sweep already did.
        assert await dead.settle(budget, 600, 100, "crashed") == 100
        assert await alive.usage(budget) == (100, 600)
        assert await alive.settle(budget, 600, 300, "a") == 400
        assert await alive.usage(budget) == (400, 0)


async def test_usage_frees_expired_leases(db_url: str, tmp_path: Path) -> None:
    clock = Clock()
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        store = DatabaseBudgetStore(acct.engine, _nothing_spent, lease_seconds=10, clock=clock)
        budget = window()
        await store.reserve(budget, 100, "old")
        clock.now += 5
        await store.reserve(budget, 200, "young")
        clock.now += 6
        assert await store.usage(budget) == (0, 200)
        assert await store.reserve(budget, 50, "young") == (True, 0, 250)  # the same id adds up, as on Redis
        assert await store.settle(budget, 250, 10, "young") == 10
        assert await store.usage(budget) == (10, 0)


async def test_settling_and_sweeping_at_once_free_each_lease_once(db_url: str, tmp_path: Path) -> None:
    clock = Clock()
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        stores = [
            DatabaseBudgetStore(acct.engine, _nothing_spent, lease_seconds=1, clock=clock) for _ in range(3)
        ]
        budget = window(limit=10_000)
        for n in range(40):
            assert (await stores[n % 3].reserve(budget, 100, f"r{n}"))[0]
        clock.now += 2  # every lease has expired: settling and sweeping race for each

        async def settle(n: int) -> None:
            await stores[n % 3].settle(budget, 100, 7, f"r{n}")

        async with anyio.create_task_group() as tg:
            for n in range(40):
                tg.start_soon(settle, n)
                if n % 8 == 0:
                    tg.start_soon(stores[(n + 1) % 3].usage, budget)
        assert await stores[0].usage(budget) == (280, 0)  # never below zero, nothing left held


async def test_a_database_in_memory_runs_on_the_engines_connection() -> None:
    engine = create_engine("sqlite+aiosqlite:///:memory:")  # a second connection would see another
    try:
        await upgrade(engine)
        clock = Clock()
        store = DatabaseBudgetStore(engine, _nothing_spent, lease_seconds=10, clock=clock)
        budget = window(limit=1_000)
        assert await store.reserve(budget, 600, "r1") == (True, 0, 600)
        assert await store.reserve(budget, 600, "r2") == (False, 0, 600)
        clock.now += 11
        assert await store.reserve(budget, 600, "r2") == (True, 0, 600)
        assert await store.settle(budget, 600, 100, "r2") == 100
        assert await store.usage(budget) == (100, 0)
        await store.aclose()
    finally:
        await engine.dispose()


async def test_a_settlement_tried_again_counts_once(db_url: str, tmp_path: Path) -> None:
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        store = DatabaseBudgetStore(acct.engine, _nothing_spent)
        await _check_settled_once(store)


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_redis)])
async def test_a_settlement_tried_again_counts_once_on_redis(redis_client: Any, _: int) -> None:
    store = RedisBudgetStore(redis_client, _nothing_spent, prefix=redis_client.test_prefix)
    await _check_settled_once(store)


async def _check_settled_once(store: Any) -> None:
    budget = window(limit=1_000)
    await store.reserve(budget, 300, "timed-out")
    await store.reserve(budget, 300, "never-reached")
    # The first try of "timed-out" got through though its caller saw a timeout.
    assert await store.settle(budget, 300, 100, "timed-out") == 100
    assert await store.settle(budget, 300, 100, "timed-out", again=True) == 100  # not twice
    assert await store.settle(budget, 300, 50, "never-reached", again=True) == 150  # held: settled now
    assert await store.usage(budget) == (150, 0)
    assert await store.settle(budget, 0, 7, "unpriced", again=True) == 157  # nothing held to tell by


class RepliesLost:
    """A shared store whose reservations are made but never reply to their caller:
    ``lose`` is called instead (it raises a timeout, or cancels the caller). ``settled``:
    the requests a settling was tried for."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.lose: Any = None
        self.settled: list[str] = []

    async def reserve(self, window: BudgetWindow, amount: int, request_id: str) -> Any:
        await self.store.reserve(window, amount, request_id)
        self.lose()
        await anyio.sleep_forever()

    async def settle(
        self, window: BudgetWindow, reserved: int, actual: int, request_id: str, **kwargs: Any
    ) -> Any:
        self.settled.append(request_id)
        return await self.store.settle(window, reserved, actual, request_id, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def test_a_reservation_whose_reply_is_lost_goes_back(db_url: str, tmp_path: Path) -> None:
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        await _check_lost_reply_given_back(DatabaseBudgetStore(acct.engine, _nothing_spent))


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_redis)])
async def test_a_reservation_whose_reply_is_lost_goes_back_on_redis(redis_client: Any, _: int) -> None:
    await _check_lost_reply_given_back(
        RedisBudgetStore(redis_client, _nothing_spent, prefix=redis_client.test_prefix)
    )


async def _check_lost_reply_given_back(store: Any) -> None:
    # The store took the reservation but the request saw a timeout, or was cancelled,
    # before its reply: the window joined the reservation only once the store replied,
    # so nothing gave it back, and the budget stayed reserved for the whole lease.
    lost = RepliesLost(store)
    budgets = BudgetManager([BudgetRule(key="*", period="total", limit=1.0)], lost)
    (budget,) = budgets.windows_for(None, "gpt-4o")

    def time_out() -> None:
        raise TimeoutError

    lost.lose = time_out
    with pytest.raises(TimeoutError):
        await budgets.reserve(None, "gpt-4o", 0.5, "timed-out")
    # Given back in the background: the request's 503 waited a second database.timeout
    # for it.
    assert lost.settled == [] and len(budgets.retries.give_backs) == 1
    await drained(budgets.retries.give_backs)
    with anyio.CancelScope() as scope:
        lost.lose = scope.cancel
        await budgets.reserve(None, "gpt-4o", 0.5, "cancelled")
    assert scope.cancelled_caught
    await drained(budgets.retries.give_backs)
    assert lost.settled == ["timed-out", "cancelled"]
    assert await store.usage(budget) == (0, 0)
    await budgets.aclose()


async def test_a_reservation_the_database_refused_has_nothing_to_give_back(tmp_path: Path) -> None:
    # The connection refused, nothing was sent: each admission refused while PostgreSQL
    # was down queued a give-back all the same, among the settlements.
    engine = create_engine("postgresql+asyncpg://postgres@127.0.0.1:9/acct")
    budgets = BudgetManager(
        [BudgetRule(key="*", period="total", limit=1.0)], DatabaseBudgetStore(engine, _nothing_spent)
    )
    with pytest.raises(ConnectionRefusedError):
        await budgets.reserve(None, "gpt-4o", 0.5, "refused")
    assert len(budgets.retries) == 0 and len(budgets.retries.give_backs) == 0
    await budgets.aclose()
    await engine.dispose()


def _day(day: int, limit: int = 1_000) -> BudgetWindow:
    start = 1_000_000.0 + day * 86_400
    return BudgetWindow(f"key-1|*|d{day}", "key-1", None, "day", start, start + 86_400, limit, None)


async def test_a_process_forgets_the_counters_of_ended_windows() -> None:
    clock = Clock()
    store = MemoryBudgetStore(_nothing_spent, clock=clock)
    clock.now = _day(0).start
    await store.reserve(_day(0), 10, "a")
    await store.reserve(window(), 10, "total")  # no end: kept
    clock.now = _day(1).start + 60  # the day before ended a minute ago: kept for late settlings
    await store.reserve(_day(1), 10, "b")
    assert set(store._counters) == {"key-1|*|d0", "key-1:total", "key-1|*|d1"}
    clock.now = _day(2).start + 2 * 3600
    await store.reserve(_day(2), 10, "c")
    assert set(store._counters) == {"key-1:total", "key-1|*|d2"}  # d0 and d1 over an hour ago


async def test_the_database_deletes_counters_a_day_after_their_window(db_url: str, tmp_path: Path) -> None:
    clock = Clock()
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        store = DatabaseBudgetStore(acct.engine, _nothing_spent, clock=clock)
        clock.now = _day(0).start
        await store.reserve(_day(0), 10, "crashed")  # never settled: its lease goes with it
        await store.reserve(window(), 10, "total")
        clock.now = _day(1).start + 3 * 3600
        await store.reserve(_day(1), 10, "b")
        other = DatabaseBudgetStore(acct.engine, _nothing_spent, clock=clock)  # a replica started later
        clock.now = _day(2).start + 2 * 3600
        await other.reserve(_day(2), 10, "c")  # d0 ended over a day ago: gone, though other never saw it
        async with acct.engine.connect() as conn:
            counters = (await conn.execute(text("SELECT counter FROM llmr_budget_counters"))).scalars().all()
            leases = (
                (await conn.execute(text("SELECT request_id FROM llmr_budget_reservations"))).scalars().all()
            )
        assert sorted(counters) == ["key-1:total", "key-1|*|d1", "key-1|*|d2"]
        assert sorted(leases) == ["b", "c", "total"]
        await store.aclose()
        await other.aclose()


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_redis)])
async def test_redis_leases_expire_with_their_window(redis_client: Any, _: int) -> None:
    store = RedisBudgetStore(redis_client, _nothing_spent, prefix=redis_client.test_prefix)
    day = _day(30_000)  # a day in 2052: the counter expires a day after it
    await store.reserve(day, 10, "crashed")  # never settled
    counter, leases = store._keys(day)
    assert await redis_client.zcard(leases) == 1
    ttl = await redis_client.ttl(counter)
    assert ttl > 86_400 and abs(await redis_client.ttl(leases) - ttl) <= 1
