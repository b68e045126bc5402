"""Settlement (after-request hooks, usage counting) finishes even when the caller is cancelled.

anyio's shielded cancel scope stops only anyio's own cancellation; on asyncio a plain
``Task.cancel()`` (``asyncio.timeout``, ``wait_for``, the service's disconnect watch) used
to cut an after-request hook that awaited (a Redis budget store, say) short: no ledger
row, no released rate-limit slot.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest

from llmrouter import Router, RouterHooks
from llmrouter.aio import to_completion
from llmrouter.config import Config, Deployment
from llmrouter.testing.scripted import ScriptedProvider, Step

pytestmark = pytest.mark.anyio


class SlowSettlement(RouterHooks):
    """An after-request hook that waits on I/O (a shared budget store) before it records."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.settled: list[str | None] = []

    async def after_request(self, ctx):
        self.entered.set()
        await asyncio.sleep(0.05)
        self.settled.append(ctx.status)


def make_router(hooks, stream_text="one two three"):
    router = Router(Config(), hooks=hooks)
    provider = ScriptedProvider(default=Step(text=stream_text))
    router.add_deployment("g", provider, Deployment(provider="scripted", model="m", id="d0"))
    return router


BODY = {"model": "g", "messages": [{"role": "user", "content": "hi"}]}


async def test_a_native_cancel_during_after_request_lets_the_hooks_finish():
    hook = SlowSettlement()
    router = make_router([hook])
    task = asyncio.create_task(router.chat(BODY))
    await hook.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The caller saw its cancellation only once the settlement had finished.
    assert hook.settled == ["ok"]


async def test_asyncio_timeout_during_a_streams_settlement_lets_the_hooks_finish():
    hook = SlowSettlement()
    router = make_router([hook])

    async def consume() -> None:
        async for _ in router.stream({**BODY, "stream": True}):
            pass

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02):
            await consume()
    assert hook.settled == ["ok"]


async def test_an_anyio_cancel_scope_does_not_cut_the_hooks_short_either():
    hook = SlowSettlement()
    router = make_router([hook])
    with anyio.move_on_after(0.02):
        await router.chat(BODY)
    assert hook.settled == ["ok"]


async def test_to_completion_returns_the_result_and_raises_the_work_error():
    async def work(value):
        await asyncio.sleep(0)
        if isinstance(value, Exception):
            raise value
        return value

    assert await to_completion(work(3)) == 3
    with pytest.raises(KeyError):
        await to_completion(work(KeyError("x")))


async def test_to_completion_under_repeated_cancels_still_waits_for_the_work():
    finished = []

    async def work():
        await asyncio.sleep(0.03)
        finished.append(True)

    task = asyncio.create_task(to_completion(work()))
    for _ in range(3):
        await asyncio.sleep(0.005)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == [True]


async def test_hooks_run_in_the_callers_task_only_when_none_of_them_waits():
    tasks: list[asyncio.Task | None] = []

    class Inline(RouterHooks):
        settles_inline = True

        async def after_request(self, ctx):
            tasks.append(asyncio.current_task())

    await make_router([Inline()]).chat(BODY)
    assert tasks == [asyncio.current_task()]
    tasks.clear()
    await make_router([Inline(), SlowSettlement()]).chat(BODY)
    assert len(tasks) == 1 and tasks[0] is not asyncio.current_task()


class Recorder(RouterHooks):
    def __init__(self) -> None:
        self.admitted = 0
        self.settled: list[str | None] = []

    async def before_request(self, ctx):
        self.admitted += 1

    async def after_request(self, ctx):
        self.settled.append(ctx.status)


class BrokenCacheLayer:
    """A cache layer whose ``stream`` raises as it is called, before any chunk."""

    def configure_group(self, name, settings):
        pass

    async def chat(self, ctx, request, call):
        return await call()

    def stream(self, ctx, request, call):
        raise RuntimeError("the cache layer broke")


async def test_a_stream_is_admitted_when_first_read_and_settled_when_its_source_fails_to_open():
    hook = Recorder()
    router = make_router([hook])
    stream = router.stream(BODY)
    assert hook.admitted == 0  # nothing happens until the first chunk is asked for
    assert [chunk async for chunk in stream]
    assert hook.admitted == 1 and hook.settled == ["ok"]
    router.cache = BrokenCacheLayer()
    with pytest.raises(RuntimeError, match="the cache layer broke"):
        [chunk async for chunk in router.stream(BODY)]
    assert hook.admitted == 2 and hook.settled == ["ok", "error"]  # admitted, so settled
