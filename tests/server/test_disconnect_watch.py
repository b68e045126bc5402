"""Client-disconnect cancellation, on the asyncio fast path and the anyio task-group path."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from llmrouter.errors import ShuttingDownError, UpstreamError
from llmrouter.server.disconnect import ClientDisconnected, _call_in_task_group, call_until_disconnect

PATHS = [
    pytest.param(call_until_disconnect, id="asyncio"),
    pytest.param(_call_in_task_group, id="task-group"),
]


def receive_after(event: anyio.Event) -> Any:
    async def receive() -> dict[str, Any]:
        await event.wait()
        return {"type": "http.disconnect"}

    return receive


@pytest.mark.anyio
@pytest.mark.parametrize("run", PATHS)
async def test_disconnect_cancels_the_call(run: Any) -> None:
    gone = anyio.Event()
    state: list[str] = []

    async def slow_call() -> str:
        state.append("started")
        gone.set()  # the client leaves while the call is in progress
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            state.append("cancelled")
            raise
        return "never"

    with anyio.fail_after(5):
        with pytest.raises(ClientDisconnected):
            await run(receive_after(gone), slow_call)
        await anyio.lowlevel.checkpoint()  # no cancellation is left pending on this task
    assert state == ["started", "cancelled"]


@pytest.mark.anyio
@pytest.mark.parametrize("run", PATHS)
async def test_result_and_errors_pass_through(run: Any) -> None:
    never = anyio.Event()

    async def answer() -> str:
        await anyio.lowlevel.checkpoint()
        return "ok"

    async def failing() -> str:
        raise UpstreamError("boom")

    assert await run(receive_after(never), answer) == "ok"
    with pytest.raises(UpstreamError, match="boom"):
        await run(receive_after(never), failing)


@pytest.mark.anyio
async def test_outer_cancellation_is_not_mistaken_for_a_disconnect() -> None:
    never = anyio.Event()

    async def slow_call() -> str:
        await anyio.sleep(30)
        return "never"

    with anyio.move_on_after(0.05) as scope:
        await call_until_disconnect(receive_after(never), slow_call)
    assert scope.cancelled_caught


@pytest.mark.anyio
async def test_a_finished_watch_leaves_nothing_for_the_garbage_collector() -> None:
    # The cancelled watcher keeps its CancelledError, whose traceback holds the watch; a
    # watch still holding the watcher made a cycle of ~20 objects on every request.
    never = anyio.Event()

    async def answer() -> str:
        await anyio.lowlevel.checkpoint()
        return "ok"

    gc.collect()
    gc.disable()
    try:
        for _ in range(50):
            assert await call_until_disconnect(receive_after(never), answer) == "ok"
        await anyio.sleep(0.01)  # the cancelled watchers finish
        collected = gc.collect()
    finally:
        gc.enable()
    assert collected < 50, f"{collected} objects in cycles after 50 requests"


@pytest.mark.anyio
async def test_the_server_cancelling_the_task_is_a_503_to_retry() -> None:
    # uvicorn cancels the requests left when its graceful shutdown runs out of time; the
    # client then got the server's plain-text 500.
    never = anyio.Event()
    started = anyio.Event()

    async def slow_call() -> str:
        started.set()
        await anyio.sleep(30)
        return "never"

    task = asyncio.ensure_future(call_until_disconnect(receive_after(never), slow_call))
    await started.wait()
    task.cancel("Task cancelled, timeout graceful shutdown exceeded")
    with pytest.raises(ShuttingDownError) as info:
        await task
    assert info.value.http_status == 503 and info.value.retry_after == 1.0
