"""A PostgreSQL that stops answering mid-run (a network partition, a hung server): a
request waits at most ``database.timeout`` on it, then gets 503 ``accounting_unavailable``.
The database is reached through a TCP proxy that the test freezes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from llmrouter.accounting import Accounting
from llmrouter.accounting.budgets import to_units
from llmrouter.accounting.config import BudgetRule
from llmrouter.accounting.extension import AccountingExtension
from llmrouter.accounting.retries import Retries
from llmrouter.context import RequestContext
from llmrouter.errors import AccountingUnavailableError

from .conftest import chat_context, finish, make_config, needs_pg

pytestmark = [pytest.mark.anyio, *needs_pg]

TIMEOUT = 0.5


class FreezableProxy:
    """Forwards connections to PostgreSQL; between :meth:`freeze` and :meth:`thaw`,
    nothing moves either way."""

    def __init__(self) -> None:
        self._thawed = anyio.Event()
        self._thawed.set()
        self.port = 0

    def freeze(self) -> None:
        self._thawed = anyio.Event()

    def thaw(self) -> None:
        self._thawed.set()

    async def _pipe(self, source: SocketStream, sink: SocketStream) -> None:
        try:
            async for data in source:
                await self._thawed.wait()
                await sink.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            await sink.aclose()

    async def _handle(self, client: SocketStream) -> None:
        await self._thawed.wait()
        async with await anyio.connect_tcp("127.0.0.1", 5432) as server, anyio.create_task_group() as tg:
            tg.start_soon(self._pipe, client, server)
            tg.start_soon(self._pipe, server, client)


@pytest.fixture
async def proxy() -> AsyncIterator[FreezableProxy]:
    proxy = FreezableProxy()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    proxy.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, proxy._handle)
        yield proxy
        proxy.thaw()
        tg.cancel_scope.cancel()


def _through(pg_url: str, proxy: FreezableProxy) -> str:
    return pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")


def _budgets_through(pg_url: str, tmp_path: Path, proxy: FreezableProxy) -> Any:
    """A day budget in the database, reached through ``proxy``, bounded by TIMEOUT."""
    config = make_config(
        _through(pg_url, proxy),
        tmp_path,
        budgets=[BudgetRule(key="*", period="day", limit=1.0)],
        budget_backend="database",
    )
    config.database.timeout = TIMEOUT
    return config


async def _refused_within_the_timeout(call: Any) -> None:
    started = time.monotonic()
    with anyio.fail_after(10), pytest.raises(AccountingUnavailableError) as raised:
        await call()
    assert raised.value.http_status == 503
    # One timeout, not two: giving back what a lost reply may have reserved waited a
    # second database.timeout before the 503.
    assert time.monotonic() - started < 2 * TIMEOUT


async def test_checking_a_key_on_a_database_that_stopped_answering(
    pg_url: str, tmp_path: Path, proxy: FreezableProxy
) -> None:
    config = make_config(_through(pg_url, proxy), tmp_path)
    config.database.timeout = TIMEOUT
    config.auth.cache_seconds = 0.0  # every request reads its key
    async with Accounting(config) as acct:
        _, secret = await acct.keys.create("partitioned")
        extension = AccountingExtension(acct)
        headers = {"authorization": f"Bearer {secret}"}
        await extension.authenticate(RequestContext(), headers)
        proxy.freeze()
        await _refused_within_the_timeout(lambda: extension.authenticate(RequestContext(), headers))
        proxy.thaw()


async def test_a_database_budget_on_a_database_that_stopped_answering(
    pg_url: str, tmp_path: Path, proxy: FreezableProxy
) -> None:
    config = _budgets_through(pg_url, tmp_path, proxy)
    async with Accounting(config) as acct:
        proxy.freeze()
        await _refused_within_the_timeout(lambda: acct.hooks.before_request(chat_context(max_cost=0.01)))
        proxy.thaw()


async def test_ready_says_whether_the_database_answers(
    pg_url: str, tmp_path: Path, proxy: FreezableProxy
) -> None:
    config = make_config(_through(pg_url, proxy), tmp_path)
    async with Accounting(config) as acct:
        extension = AccountingExtension(acct)
        report = await extension.check()
        assert (report["database"], report["ready"]) == ("ok", True)
        assert "ledger_pending" in report  # the ledger's counters too
        proxy.freeze()
        await anyio.sleep(1.1)  # past the reuse of the last check
        started = time.monotonic()
        report = await extension.check()
        assert report["ready"] is False and report["database"] == "TimeoutError"
        assert time.monotonic() - started < 2.5
        proxy.thaw()


async def test_a_settlement_the_database_did_not_answer_counts_once(
    pg_url: str, tmp_path: Path, proxy: FreezableProxy
) -> None:
    # The database stops answering as the request settles: the request gives up after
    # the timeout, and the settlement reaches PostgreSQL once it answers again (the spend
    # counted, the reservation given back). A first try that got through though its reply
    # was lost is test_acct_budget_store's "tried again" test.
    config = _budgets_through(pg_url, tmp_path, proxy)
    acct = Accounting(config)
    acct.retries = Retries(first_delay=0.05)  # rather than after 1 s
    async with acct:
        ctx = chat_context(max_cost=0.01)
        await acct.hooks.before_request(ctx)
        proxy.freeze()
        with anyio.fail_after(5):
            await acct.hooks.after_request(finish(ctx, cost=0.004))
        assert len(acct.retries) == 1 == acct.readiness()["settlements_waiting"]
        await anyio.sleep(0.3)
        proxy.thaw()
        with anyio.fail_after(10):
            while len(acct.retries):  # noqa: ASYNC110 - a count, not an event
                await anyio.sleep(0.05)
        window = acct.budgets.windows_for(None, "gpt-4o")[0]
        assert await acct.budgets.store.usage(window) == (to_units(0.004), 0)


async def test_usage_on_a_database_that_stopped_answering(
    pg_url: str, tmp_path: Path, proxy: FreezableProxy
) -> None:
    # What /v1/usage reads: the ledger's report, and each budget window's counter (which
    # had no bound: the request hung on the frozen connection).
    config = _budgets_through(pg_url, tmp_path, proxy)
    async with Accounting(config) as acct:
        assert acct.budgets is not None
        window = acct.budgets.windows_for(None, "gpt-4o")[0]
        await acct.budgets.store.usage(window)
        proxy.freeze()
        await _refused_within_the_timeout(lambda: acct.usage(by=["model"]))
        with anyio.fail_after(5), pytest.raises(TimeoutError):
            await acct.budgets.store.usage(window)
        proxy.thaw()
