"""Budgets are exact under concurrency: many requests racing for a small budget never
overspend it, on every backend (memory, Redis, the database on SQLite and PostgreSQL),
and across replicas that share Redis or the database."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import text

from llmrouter.accounting import Accounting
from llmrouter.accounting.budgets import UNITS_PER_USD, to_units
from llmrouter.accounting.config import BudgetRule, LimitsConfig
from llmrouter.errors import BudgetExceededError

from .conftest import chat_context, finish, make_config, needs_pg, needs_redis, redis_config

pytestmark = pytest.mark.anyio

MAX_COST = 0.00005  # 10 prompt tokens + 20 max output tokens at $1 / $2 per million
FITS = 7
REQUESTS = 100


async def _race(
    replicas: list[Accounting], *, actual_cost: Any = lambda: MAX_COST
) -> tuple[int, int, list[float]]:
    """Fire REQUESTS concurrent requests spread over the replicas; returns (admitted,
    refused, costs billed). Admitted requests stay in flight a little so they overlap."""
    admitted = refused = 0
    billed: list[float] = []

    async def one(i: int) -> None:
        nonlocal admitted, refused
        acct = replicas[i % len(replicas)]
        ctx = chat_context(max_cost=MAX_COST)
        try:
            await acct.hooks.before_request(ctx)
        except BudgetExceededError as exc:
            assert exc.http_status == 429 and exc.code == "insufficient_quota" and not exc.retryable
            assert exc.retry_after is not None and exc.retry_after > 0
            refused += 1
            return
        admitted += 1
        await anyio.sleep(random.random() * 0.02)
        cost = actual_cost()
        billed.append(cost)
        await acct.hooks.after_request(finish(ctx, cost=cost))

    async with anyio.create_task_group() as tg:
        for i in range(REQUESTS):
            tg.start_soon(one, i)
    return admitted, refused, billed


async def _ledger_total(acct: Accounting) -> float:
    await acct.ledger.flush()
    async with acct.engine.connect() as conn:
        return (
            await conn.execute(text("SELECT COALESCE(SUM(cost), 0) FROM llmr_ledger WHERE status = 'ok'"))
        ).scalar_one()


def _rule() -> list[BudgetRule]:
    return [BudgetRule(key="*", period="day", limit=FITS * MAX_COST)]


async def _check_exact(replicas: list[Accounting]) -> None:
    admitted, refused, _billed = await _race(replicas)
    assert admitted == FITS and refused == REQUESTS - FITS
    window = replicas[0].budgets.windows_for(None, "gpt-4o")[0]
    spent, reserved = await replicas[0].budgets.store.usage(window)
    assert reserved == 0
    assert spent == FITS * to_units(MAX_COST) == window.limit
    for replica in replicas[1:]:
        await replica.ledger.flush()
    assert abs(await _ledger_total(replicas[0]) - FITS * MAX_COST) < 1e-12


async def test_memory_backend_exact(sqlite_url: str, tmp_path: Path) -> None:
    config = make_config(sqlite_url, tmp_path, budgets=_rule(), budget_backend="memory")
    async with Accounting(config) as acct:
        await _check_exact([acct])


@pytest.mark.parametrize("backend", ["database"])
async def test_database_backend_exact_across_two_replicas(db_url: str, tmp_path: Path, backend: str) -> None:
    config = make_config(db_url, tmp_path, budgets=_rule(), budget_backend=backend)
    async with Accounting(config) as one, Accounting(config) as two:
        await _check_exact([one, two])


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_redis)])
async def test_redis_backend_exact_across_two_replicas(
    sqlite_url: str, tmp_path: Path, redis_client: Any, _: int
) -> None:
    config = make_config(
        sqlite_url, tmp_path, budgets=_rule(), budget_backend="redis", redis=redis_config(redis_client)
    )
    async with Accounting(config, redis=redis_client) as one, Accounting(config, redis=redis_client) as two:
        await _check_exact([one, two])


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_pg + needs_redis)])
async def test_redis_backend_with_postgres_ledger(
    pg_url: str, tmp_path: Path, redis_client: Any, _: int
) -> None:
    config = make_config(
        pg_url, tmp_path, budgets=_rule(), budget_backend="redis", redis=redis_config(redis_client)
    )
    async with Accounting(config, redis=redis_client) as one, Accounting(config, redis=redis_client) as two:
        await _check_exact([one, two])


async def test_cheaper_than_reserved_requests_never_overspend(
    sqlite_url: str, tmp_path: Path, shared_backend: tuple[str, Any]
) -> None:
    backend, redis = shared_backend
    extra = {"redis": redis_config(redis)} if redis is not None else {}
    config = make_config(sqlite_url, tmp_path, budgets=_rule(), budget_backend=backend, **extra)
    async with Accounting(config, redis=redis) as acct:
        for _ in range(3):  # waves: later ones fit in what cheaper earlier ones left
            _admitted, _refused, _billed = await _race(
                [acct], actual_cost=lambda: random.choice([0.0, MAX_COST / 3, MAX_COST])
            )
        window = acct.budgets.windows_for(None, "gpt-4o")[0]
        spent, reserved = await acct.budgets.store.usage(window)
        assert reserved == 0 and 0 < spent <= window.limit
        # each settlement rounds to the nearest nano-dollar
        assert abs(await _ledger_total(acct) - spent / UNITS_PER_USD) <= 3 * REQUESTS / UNITS_PER_USD


async def test_spend_survives_restart_through_the_ledger(sqlite_url: str, tmp_path: Path) -> None:
    config = make_config(sqlite_url, tmp_path, budgets=_rule(), budget_backend="memory")
    async with Accounting(config) as acct:
        admitted, _, _ = await _race([acct])
        assert admitted == FITS
    async with Accounting(config) as again:  # a restarted process: counters seeded from the ledger
        with pytest.raises(BudgetExceededError):
            await again.hooks.before_request(chat_context(max_cost=MAX_COST))


async def test_per_key_per_model_and_soft_limits(acct: Accounting, caplog: pytest.LogCaptureFixture) -> None:
    acct.budgets.rules = [
        BudgetRule(key="team", model="gpt-4o", period="month", limit=2 * MAX_COST, soft_limit=MAX_COST),
    ]
    key, _ = await acct.keys.create("team", budget=10 * MAX_COST, budget_period="total")
    other, _ = await acct.keys.create("other")
    for _ in range(2):
        ctx = chat_context(key, max_cost=MAX_COST)
        await acct.hooks.before_request(ctx)
        await acct.hooks.after_request(finish(ctx, cost=MAX_COST))
    assert ctx.metadata.get("budget") == "soft_limit_reached"
    assert "soft limit crossed" in caplog.text
    with pytest.raises(BudgetExceededError, match="for model gpt-4o"):
        await acct.hooks.before_request(chat_context(key, max_cost=MAX_COST))
    # another model still fits the key's own (total) budget; another key is not limited
    ctx = chat_context(key, model="gpt-4o-mini", max_cost=MAX_COST)
    await acct.hooks.before_request(ctx)
    await acct.hooks.after_request(finish(ctx, cost=MAX_COST))
    ctx = chat_context(other, max_cost=MAX_COST)
    await acct.hooks.before_request(ctx)
    await acct.hooks.after_request(finish(ctx, cost=MAX_COST))
    status = {(b["model"], b["period"]): b for b in await acct.budgets.status(key, ["gpt-4o", "gpt-4o-mini"])}
    assert status[("gpt-4o", "month")]["spent"] == pytest.approx(2 * MAX_COST)
    assert status[(None, "total")]["spent"] == pytest.approx(3 * MAX_COST)


async def test_refused_request_gives_back_what_it_took(acct: Accounting) -> None:
    """A budget refusal after the limiter admitted must free the concurrency slot."""
    acct.budgets.rules = [BudgetRule(limit=MAX_COST / 2)]
    acct.hooks.limits = type(acct.hooks.limits)(concurrency=1)
    for _ in range(3):
        with pytest.raises(BudgetExceededError):
            await acct.hooks.before_request(chat_context(max_cost=MAX_COST))
    ctx = chat_context(max_cost=MAX_COST / 4)  # fits: the slot must be free
    await acct.hooks.before_request(ctx)
    await acct.hooks.after_request(finish(ctx, cost=MAX_COST / 4))


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_redis)])
async def test_redis_losing_its_data_reseeds_spend_from_the_ledger(
    sqlite_url: str, tmp_path: Path, redis_client: Any, _: int
) -> None:
    config = make_config(
        sqlite_url, tmp_path, budgets=_rule(), budget_backend="redis", redis=redis_config(redis_client)
    )
    async with Accounting(config, redis=redis_client) as acct:
        for _i in range(FITS - 1):
            ctx = chat_context(max_cost=MAX_COST)
            await acct.hooks.before_request(ctx)
            await acct.hooks.after_request(finish(ctx, cost=MAX_COST))
        held = chat_context(max_cost=MAX_COST)
        await acct.hooks.before_request(held)  # in flight while Redis restarts empty
        async for key in redis_client.scan_iter(match=f"{redis_client.test_prefix}*"):
            await redis_client.delete(key)
        await acct.hooks.after_request(finish(held, cost=MAX_COST))  # settles into a re-seeded window
        with pytest.raises(BudgetExceededError):
            await acct.hooks.before_request(chat_context(max_cost=MAX_COST))
        window = acct.budgets.windows_for(None, "gpt-4o")[0]
        assert (await acct.budgets.store.usage(window))[0] == window.limit


def _store_down_for(is_down: Callable[[Any], bool]) -> Any:
    """A memory budget store whose reserve fails (its database down) for the windows
    ``is_down`` picks, nothing spent before."""
    from llmrouter.accounting.budgets import MemoryBudgetStore

    class WindowsDown(MemoryBudgetStore):
        async def reserve(self, window: Any, amount: int, request_id: str) -> tuple[bool, int, int]:
            if is_down(window):
                raise ConnectionError("connection refused")
            return await super().reserve(window, amount, request_id)

    async def nothing_spent(_: object) -> int:
        return 0

    return WindowsDown(nothing_spent)


async def test_a_store_failing_half_way_gives_back_what_was_reserved() -> None:
    from llmrouter.accounting.budgets import BudgetManager

    store = _store_down_for(lambda window: window.period == "month")
    budgets = BudgetManager(
        [BudgetRule(key="*", period="day", limit=1.0), BudgetRule(key="*", period="month", limit=1.0)], store
    )
    day, month = budgets.windows_for(None, "gpt-4o")
    assert (day.period, month.period) == ("day", "month")
    with pytest.raises(ConnectionError):
        await budgets.reserve(None, "gpt-4o", 0.5, "req-1")
    assert await store.usage(day) == (0, 0)  # the day's reservation went back
    assert await store.usage(month) == (0, 0)  # and in memory a failed one took nothing to give back


async def test_a_store_failing_on_a_fallbacks_budget_gives_back_the_whole_reservation() -> None:
    from llmrouter.accounting.budgets import BudgetManager

    store = _store_down_for(lambda window: window.model == "dear")
    budgets = BudgetManager(
        [
            BudgetRule(key="*", period="day", limit=1.0),
            BudgetRule(key="*", model="dear", period="day", limit=1.0),
        ],
        store,
    )
    day = budgets.windows_for(None, "cheap")[0]
    reservation = await budgets.reserve(None, "cheap", 0.5, "req-1")
    assert (await store.usage(day))[1] > 0
    with pytest.raises(ConnectionError):
        await budgets.reserve_fallbacks(reservation, None, ["dear"], 0.5)
    assert await store.usage(day) == (0, 0)  # the requested group's reservation went back too


async def test_a_refusal_says_whether_trying_again_soon_can_pass(sqlite_url: str, tmp_path: Path) -> None:
    rule = BudgetRule(key="*", period="total", limit=2 * MAX_COST)
    config = make_config(sqlite_url, tmp_path, budgets=[rule], budget_backend="memory")
    async with Accounting(config) as acct:
        first, second = chat_context(max_cost=MAX_COST), chat_context(max_cost=MAX_COST)
        await acct.hooks.before_request(first)
        await acct.hooks.before_request(second)
        # Only the two in flight are in the way: they may settle for less, so soon may pass.
        with pytest.raises(BudgetExceededError) as reserved:
            await acct.hooks.before_request(chat_context(max_cost=MAX_COST))
        assert reserved.value.retry_after == 1.0 and "x-should-retry" not in reserved.value.headers()
        await acct.hooks.after_request(finish(first, cost=MAX_COST))
        await acct.hooks.after_request(finish(second, cost=MAX_COST))
        # Spent to the limit, and a total budget never resets: the OpenAI SDKs must not retry.
        with pytest.raises(BudgetExceededError) as spent:
            await acct.hooks.before_request(chat_context(max_cost=MAX_COST))
        assert spent.value.retry_after is None and spent.value.headers() == {"x-should-retry": "false"}


async def test_a_request_costlier_than_the_limit_itself_is_not_told_to_retry(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Its maximum cost alone is over the day's limit, so no reset makes room for it: it
    was told to retry at UTC midnight (``Retry-After`` of hours), to be refused again."""
    config = make_config(
        sqlite_url, tmp_path, budgets=[BudgetRule(period="day", limit=MAX_COST)], budget_backend="memory"
    )
    async with Accounting(config) as acct:
        with pytest.raises(BudgetExceededError) as info:
            await acct.hooks.before_request(chat_context(max_cost=2 * MAX_COST))
        error = info.value
        assert error.retry_after is None and error.headers() == {"x-should-retry": "false"}
        assert "may cost up to $0.000100, more than the day limit $0.000050" in error.message
        assert (
            "lower max_tokens (a request without it is bounded by router.default_max_tokens)" in error.message
        )


async def test_a_used_up_budget_tells_a_free_request_to_wait_for_the_reset(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A free request (``max_cost`` 0 or unknown) is refused once spend reaches the limit,
    and only the period's end can change that: it was told to retry in 1 s, without
    ``x-should-retry: false``, as if other requests' reservations were in the way."""
    config = make_config(
        sqlite_url, tmp_path, budgets=[BudgetRule(period="day", limit=MAX_COST)], budget_backend="memory"
    )
    async with Accounting(config) as acct:
        ctx = chat_context(max_cost=MAX_COST)
        await acct.hooks.before_request(ctx)
        await acct.hooks.after_request(finish(ctx, cost=MAX_COST))  # spends exactly the limit
        for free in (0.0, None):
            with pytest.raises(BudgetExceededError) as info:
                await acct.hooks.before_request(chat_context(max_cost=free))
            error = info.value
            assert error.until_reset and error.headers()["x-should-retry"] == "false"
            assert error.retry_after is not None and error.retry_after > 1.0  # the day's end


async def test_usage_status_lists_the_per_model_budgets_of_the_key(acct: Accounting) -> None:
    """``/v1/usage`` asks for a key's budgets without a model: those of a rule for one
    model apply to the key all the same, and were left out."""
    acct.budgets.rules = [
        BudgetRule(key="app", model="gpt-4o-mini", period="day", limit=2.0),
        BudgetRule(key="app", period="month", limit=50.0),
        BudgetRule(key="other", model="gpt-4o", period="day", limit=1.0),  # another key's
    ]
    key, _ = await acct.keys.create("app")
    ctx = chat_context(key, model="gpt-4o-mini", max_cost=MAX_COST)
    await acct.hooks.before_request(ctx)
    await acct.hooks.after_request(finish(ctx, cost=MAX_COST))
    status = {(b["model"], b["period"]): b for b in await acct.budgets.status(key)}
    assert set(status) == {("gpt-4o-mini", "day"), (None, "month")}
    assert status[("gpt-4o-mini", "day")]["limit"] == 2.0
    assert status[("gpt-4o-mini", "day")]["spent"] == pytest.approx(MAX_COST)


async def test_per_end_user_budgets_are_exact_and_separate(
    sqlite_url: str, tmp_path: Path, shared_backend: tuple[str, Any]
) -> None:
    """A ``user: "*"`` rule caps each end user (the OpenAI ``user`` field) of a key on
    its own, exactly under concurrency; requests that name no user are not counted."""
    backend, redis = shared_backend
    extra = {"redis": redis_config(redis)} if redis is not None else {}
    rules = [BudgetRule(key="*", user="*", period="day", limit=FITS * MAX_COST)]
    config = make_config(sqlite_url, tmp_path, budgets=rules, budget_backend=backend, **extra)
    async with Accounting(config, redis=redis) as acct:
        admitted: dict[str | None, int] = {}

        async def one(user: str | None) -> None:
            ctx = chat_context(max_cost=MAX_COST, user=user)
            try:
                await acct.hooks.before_request(ctx)
            except BudgetExceededError as exc:
                assert "for end user" in exc.message and repr(user) in exc.message
                return
            admitted[user] = admitted.get(user, 0) + 1
            await anyio.sleep(random.random() * 0.02)
            await acct.hooks.after_request(finish(ctx, cost=MAX_COST))

        async with anyio.create_task_group() as tg:
            for i in range(REQUESTS):
                tg.start_soon(one, ("user-a", "user-b", None)[i % 3])
        assert admitted == {"user-a": FITS, "user-b": FITS, None: REQUESTS // 3}
        [window] = acct.budgets.windows_for(None, "gpt-4o", end_user="user-a")
        assert await acct.budgets.store.usage(window) == (FITS * to_units(MAX_COST), 0)


async def test_a_per_user_budget_is_seeded_from_that_users_rows(sqlite_url: str, tmp_path: Path) -> None:
    rules = [BudgetRule(key="*", user="*", period="month", limit=2 * MAX_COST)]
    config = make_config(sqlite_url, tmp_path, budgets=rules, budget_backend="memory")
    name = "é" * 250 + "\x00"  # longer than the ledger keeps, with a NUL it drops
    async with Accounting(config) as acct:
        for user in (name, name, "other"):
            ctx = chat_context(max_cost=MAX_COST, user=user)
            await acct.hooks.before_request(ctx)
            await acct.hooks.after_request(finish(ctx, cost=MAX_COST))
    async with Accounting(config) as again:  # a restarted process: each user's spend from the ledger
        with pytest.raises(BudgetExceededError):
            await again.hooks.before_request(chat_context(max_cost=MAX_COST, user=name))
        ctx = chat_context(max_cost=MAX_COST, user="other")
        await again.hooks.before_request(ctx)
        await again.hooks.after_request(finish(ctx, cost=MAX_COST))


async def test_a_crashed_replicas_database_reservations_are_freed_after_the_lease(
    db_url: str, tmp_path: Path
) -> None:
    await _check_crash_freed(
        make_config(
            db_url,
            tmp_path,
            budgets=_rule(),
            budget_backend="database",
            limits=LimitsConfig(lease_seconds=0.5),
        )
    )


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_redis)])
async def test_a_crashed_replicas_redis_reservations_are_freed_after_the_lease(
    sqlite_url: str, tmp_path: Path, redis_client: Any, _: int
) -> None:
    config = make_config(
        sqlite_url,
        tmp_path,
        budgets=_rule(),
        budget_backend="redis",
        redis=redis_config(redis_client),
        limits=LimitsConfig(lease_seconds=0.5),
    )
    await _check_crash_freed(config, redis_client)


async def _check_crash_freed(config: Any, redis: Any = None) -> None:
    async with Accounting(config, redis=redis) as crashed, Accounting(config, redis=redis) as alive:
        for _ in range(FITS):  # admitted, then the replica dies before settling any of them
            await crashed.hooks.before_request(chat_context(max_cost=MAX_COST))
        with pytest.raises(BudgetExceededError):
            await alive.hooks.before_request(chat_context(max_cost=MAX_COST))
        await anyio.sleep(0.6)
        ctx = chat_context(max_cost=MAX_COST)
        await alive.hooks.before_request(ctx)  # the dead replica's reservations are gone
        await alive.hooks.after_request(finish(ctx, cost=MAX_COST))
        window = alive.budgets.windows_for(None, "gpt-4o")[0]
        assert await alive.budgets.store.usage(window) == (to_units(MAX_COST), 0)


async def test_budget_gauges_are_the_key_windows_last_seen() -> None:
    from llmrouter.accounting.budgets import BudgetManager, MemoryBudgetStore

    async def spent_before(_: object) -> int:
        return to_units(0.25)

    rules = [
        BudgetRule(key="*", period="day", limit=1.0),
        BudgetRule(key="*", model="gpt-4o", period="total", limit=5.0),
        BudgetRule(key="*", user="*", period="day", limit=0.5),  # per end user: not a metric
    ]
    budgets = BudgetManager(rules, MemoryBudgetStore(spent_before))
    assert budgets.gauges() == []
    reservation = await budgets.reserve(None, "gpt-4o", 0.1, "r1", end_user="customer-42")
    await budgets.settle(reservation, 0.05)
    gauges = {
        (a["llmrouter.budget.period"], a["gen_ai.request.model"]): (s, lim) for a, s, lim in budgets.gauges()
    }
    assert gauges == {("day", "*"): (0.3, 1.0), ("total", "gpt-4o"): (0.3, 5.0)}
    assert {a["llmrouter.api_key.id"] for a, _, _ in budgets.gauges()} == {"none"}
    tomorrow = time.time() + 86_400
    assert [a["llmrouter.budget.period"] for a, _, _ in budgets.gauges(now=tomorrow)] == ["total"]
