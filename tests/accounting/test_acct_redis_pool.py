"""Accounting's own Redis client (``accounting.redis.url``) under load and when Redis
stops answering: checks wait for a free connection rather than fail, and a silent Redis
fails a request within ``redis.timeout`` rather than holding it."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from llmrouter.accounting import Accounting
from llmrouter.accounting.config import BudgetRule, LimitsConfig, RedisConfig
from llmrouter.errors import AccountingUnavailableError

from .conftest import REDIS_URL, chat_context, finish, make_config, needs_redis

pytestmark = pytest.mark.anyio

REQUESTS = 300  # three times the pool's 100 connections


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_redis)])
async def test_more_concurrent_requests_than_connections_wait_for_one(
    sqlite_url: str, tmp_path: Path, redis_prefix: str, _: int
) -> None:
    config = make_config(
        sqlite_url,
        tmp_path,
        redis=RedisConfig(url=REDIS_URL, prefix=redis_prefix),
        budget_backend="redis",
        budgets=[BudgetRule(key="*", period="day", limit=1.0)],
        limits=LimitsConfig(rpm=10 * REQUESTS),
    )
    failed: list[BaseException] = []

    async def one() -> None:
        ctx = chat_context(max_cost=0.0001)
        try:
            await acct.hooks.before_request(ctx)
        except AccountingUnavailableError as exc:
            failed.append(exc)
            return
        await anyio.sleep(0.01)
        await acct.hooks.after_request(finish(ctx, cost=0.0001))

    async with Accounting(config) as acct:
        async with anyio.create_task_group() as tg:
            for _i in range(REQUESTS):
                tg.start_soon(one)
        assert failed == []
        assert acct.budgets is not None
        window = acct.budgets.windows_for(None, "gpt-4o")[0]
        assert await acct.budgets.store.usage(window) == (REQUESTS * 100_000, 0)


async def test_a_redis_that_does_not_answer_fails_requests_within_the_timeout(
    sqlite_url: str, tmp_path: Path
) -> None:
    accepted: list[SocketStream] = []

    async def hold(stream: SocketStream) -> None:  # reads commands, never replies
        accepted.append(stream)
        async for _chunk in stream:
            pass

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    config = make_config(
        sqlite_url,
        tmp_path,
        redis=RedisConfig(url=f"redis://127.0.0.1:{port}/0", timeout=0.3),
        budgets=[BudgetRule(key="*", period="day", limit=1.0)],
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hold)
        async with Accounting(config) as acct:
            started = time.monotonic()
            with anyio.fail_after(10), pytest.raises(AccountingUnavailableError) as raised:
                await acct.hooks.before_request(chat_context(max_cost=0.0001))
            assert raised.value.http_status == 503 and raised.value.retry_after == 1
            assert time.monotonic() - started < 3
            assert accepted  # it did reach the silent server
        tg.cancel_scope.cancel()


async def test_ready_says_whether_redis_answers(sqlite_url: str, tmp_path: Path) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    config = make_config(sqlite_url, tmp_path, redis=RedisConfig(url=f"redis://127.0.0.1:{port}/0"))
    async with Accounting(config) as acct:
        report = await acct.check_stores()
    assert report["database"] == "ok" and report["ready"] is False
    assert report["redis"].startswith("ConnectionError")
