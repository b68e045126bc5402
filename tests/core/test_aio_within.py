"""``llmrouter.aio.within``: a bound on the caller's wait, not on the work's clean-up."""

from __future__ import annotations

import asyncio
import time

import pytest

from llmrouter.aio import _abandoned, within

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_returns_the_result_in_time() -> None:
    async def work() -> int:
        await asyncio.sleep(0.01)
        return 7

    assert await within(1.0, work()) == 7
    assert await within(None, work()) == 7


async def test_frees_the_caller_at_the_bound_while_the_work_cleans_up() -> None:
    cleaned = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(60)
        finally:  # like closing a connection to a server that stopped answering
            await asyncio.shield(asyncio.sleep(0.5))
            cleaned.set()

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await within(0.05, slow_to_stop())
    assert time.monotonic() - started < 0.3 and not cleaned.is_set()
    assert len(_abandoned) == 1  # kept alive while it finishes
    await asyncio.wait_for(cleaned.wait(), 2)
    await asyncio.sleep(0)
    assert not _abandoned


async def test_errors_reach_the_caller_and_a_cancelled_caller_cancels_the_work() -> None:
    async def fails() -> None:
        raise LookupError("no row")

    with pytest.raises(LookupError):
        await within(1.0, fails())

    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def runs() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    caller = asyncio.ensure_future(within(10.0, runs()))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(cancelled.wait(), 1)
