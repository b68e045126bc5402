"""Fixtures for accounting tests: SQLite files, a fresh PostgreSQL database per test and
a Redis key prefix per test, against the real servers on 127.0.0.1.

PostgreSQL/Redis tests are marked ``postgres`` / ``redis`` and skip with the reason when
the server is not reachable (``.ci/run`` makes such skips fail).
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Iterator, Sized
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from llmrouter.accounting import Accounting
from llmrouter.accounting.config import AccountingConfig, DatabaseConfig, LedgerConfig, RedisConfig
from llmrouter.context import RequestContext
from llmrouter.types import ChatRequest, Usage

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


PG_UP = _reachable(5432)
REDIS_UP = _reachable(6379)
needs_pg = [
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_UP, reason="PostgreSQL is not running on 127.0.0.1:5432"),
]
needs_redis = [
    pytest.mark.redis,
    pytest.mark.skipif(not REDIS_UP, reason="Redis is not running on 127.0.0.1:6379"),
]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'acct.db'}"


def _pg_admin(sql: str) -> None:
    """Run one statement as the PostgreSQL superuser (in a thread with its own loop, so
    that sync fixtures can use it whatever loop the test runs)."""
    import asyncio
    import threading

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(run())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    if errors:
        raise errors[0]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database on the local PostgreSQL, dropped afterwards."""
    if not PG_UP:
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    name = f"llmr_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_pg)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'acct.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
async def redis_client() -> AsyncIterator[Any]:
    """A client whose keys all start with ``client.test_prefix``; deleted afterwards."""
    async with _redis_client() as client:
        yield client


@pytest.fixture(params=["memory", "database", pytest.param("redis", marks=needs_redis)])
async def shared_backend(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Any]]:
    """``(budget_backend, redis client or None)`` for each budget/limit backend."""
    if request.param != "redis":
        yield request.param, None
        return
    async with _redis_client() as client:
        yield "redis", client


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix of its own on the local Redis, for accountings that connect by URL
    (``RedisConfig(url=REDIS_URL, prefix=...)``); the keys under it are deleted afterwards."""
    async with _redis_client() as client:
        yield client.test_prefix


@asynccontextmanager
async def _redis_client() -> AsyncIterator[Any]:
    if not REDIS_UP:
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    client.test_prefix = f"llmr-test-{uuid.uuid4().hex[:10]}:"  # type: ignore[attr-defined]
    try:
        yield client
    finally:
        async for key in client.scan_iter(match=f"{client.test_prefix}*"):  # type: ignore[attr-defined]
            await client.delete(key)
        await client.aclose()


def make_config(db_url: str, tmp_path: Path, **kwargs: Any) -> AccountingConfig:
    """An accounting config on ``db_url`` with a journal in ``tmp_path`` and fast flushes."""
    ledger = kwargs.pop("ledger", None) or LedgerConfig(
        journal_dir=str(tmp_path / "journal"), flush_interval=0.02
    )
    return AccountingConfig(database=DatabaseConfig(url=db_url), ledger=ledger, **kwargs)


def redis_config(client: Any) -> RedisConfig:
    return RedisConfig(url=None, prefix=client.test_prefix)


def chat_context(
    principal: Any = None,
    *,
    model: str = "gpt-4o",
    max_cost: float | None = None,
    prompt_tokens: int = 10,
    user: str | None = None,
) -> RequestContext:
    """A context as the router hands it to ``before_request`` (``user``: the request's
    OpenAI ``user`` field)."""
    request = ChatRequest(model=model, messages=[{"role": "user", "content": "hi"}], user=user)  # type: ignore[list-item]
    return RequestContext(
        principal=principal,
        request=request,
        model_group=model,
        max_cost=max_cost,
        prompt_tokens_estimate=prompt_tokens,
    )


def finish(
    ctx: RequestContext,
    *,
    prompt: int = 10,
    completion: int = 20,
    cost: float | None = None,
    status: str = "ok",
    estimated: bool = False,
) -> RequestContext:
    """Fill ``ctx`` as the router does after the call."""
    import time

    ctx.usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        estimated=estimated,
    )
    ctx.cost = cost
    ctx.cost_source = "price_table" if cost else "unpriced"
    ctx.status = status  # type: ignore[assignment]
    ctx.deployment, ctx.provider = f"openai/{ctx.model_group}", "openai"
    ctx.finished_at = time.perf_counter()
    return ctx


async def drained(waiting: Sized) -> None:
    """Wait until ``waiting`` (settlements or give-backs, tried in the background) is
    empty."""
    import anyio

    with anyio.fail_after(5):
        while len(waiting):  # noqa: ASYNC110 - a count, not an event
            await anyio.sleep(0.01)


@pytest.fixture
async def acct(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Accounting]:
    async with Accounting(make_config(sqlite_url, tmp_path)) as accounting:
        yield accounting


_KILLED_PRELUDE = """\
import os, sys, anyio, msgspec
sys.path.insert(0, {root!r})
from llmrouter.accounting import Accounting
from llmrouter.accounting.config import AccountingConfig
from tests.accounting.conftest import finish
from tests.accounting.test_acct_interrupted import COST, _context
from tests.accounting.test_acct_unsettled import Outage

async def started():
    acct = Accounting(msgspec.json.decode({config!r}, type=AccountingConfig))
    await acct.start()
    return acct
"""


def killed_script(main: str, config: AccountingConfig) -> str:
    """A script for :func:`run_killed`: ``main`` (the source of ``async def main()``, which
    ends with ``os._exit(9)``) after the imports the accounting tests' scripts use, and
    ``started()``, which starts an :class:`Accounting` on ``config``."""
    import textwrap

    import msgspec

    prelude = _KILLED_PRELUDE.format(
        root=str(Path(__file__).parents[2]), config=msgspec.json.encode(config).decode()
    )
    return f"{prelude}\n{textwrap.dedent(main)}\nanyio.run(main)\n"


async def run_killed(script: str, cwd: Path) -> str:
    """Run ``script`` (Python source that ends with ``os._exit(9)``, killed as ``kill -9``
    would leave it) in a process of its own; its standard output."""
    import os
    import sys

    import anyio

    with anyio.fail_after(120):
        result = await anyio.run_process(
            [sys.executable, "-c", script],
            cwd=str(cwd),
            check=False,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
    assert result.returncode == 9, result.stderr.decode()
    return result.stdout.decode()
