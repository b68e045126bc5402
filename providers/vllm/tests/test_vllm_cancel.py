"""Cancellation: a cancelled request is aborted inside the engine, which keeps serving."""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any

import anyio
import pytest

from llmrouter.types import decode_chat_request

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.anyio,
    pytest.mark.skipif(
        find_spec("vllm") is None, reason="vLLM is not installed here (scripts/setup-vllm-env)"
    ),
]

# Long enough that, were it not aborted, the request would still be decoding in the
# engine when the next request runs (~200 steps, seconds on this CPU).
LONG = 200


def request(provider: Any, max_tokens: int, **fields: Any) -> Any:
    return decode_chat_request(
        {
            "model": provider.model,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            **fields,
        }
    )


async def engine_idle(provider: Any) -> dict[str, Any]:
    """Wait (bounded) until the engine's front end has no unfinished request."""
    with anyio.fail_after(10):
        # Polling: the engine's counters have no event to wait on.
        while (stats := provider.engine_stats())["unfinished_requests"] or stats["in_flight"]:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    return stats


async def running_while_streaming(provider: Any) -> int:
    """How many requests the scheduler runs while one fresh request streams."""
    seen = []
    stream = provider.stream(request(provider, 40))
    async for chunk in stream:
        if chunk.choices:
            seen.append(provider.engine_stats()["requests_running"])
    assert chunk.usage is not None and chunk.usage.completion_tokens == 40
    return max(seen)


async def test_closing_a_stream_aborts_the_engine_request(tiny_vllm: Any) -> None:
    stream = tiny_vllm.stream(request(tiny_vllm, LONG))
    received = 0
    async for chunk in stream:
        received += len(chunk.choices)
        if received >= 3:
            break
    with anyio.fail_after(5):  # generous bound: closing must not wait for the generation
        await stream.aclose()
    await engine_idle(tiny_vllm)
    # Were the request still decoding in the engine core, the scheduler would run two.
    assert await running_while_streaming(tiny_vllm) == 1
    assert (await tiny_vllm.health()).ok


async def test_cancel_scope_aborts_chat_and_stream(tiny_vllm: Any) -> None:
    chunks = 0

    async def consume() -> None:
        nonlocal chunks
        async for chunk in tiny_vllm.stream(request(tiny_vllm, LONG)):
            chunks += len(chunk.choices)
            if chunks >= 3:
                scope.cancel()

    with anyio.CancelScope() as scope:
        await consume()
    assert scope.cancelled_caught and chunks >= 3
    await engine_idle(tiny_vllm)

    # A non-streaming chat cancelled while the engine is generating.
    async with anyio.create_task_group() as group:
        group.start_soon(tiny_vllm.chat, request(tiny_vllm, LONG, stream=False))
        with anyio.fail_after(10):
            while not tiny_vllm.engine_stats()["in_flight"]:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        await anyio.sleep(0.1)
        group.cancel_scope.cancel()
    await engine_idle(tiny_vllm)
    assert await running_while_streaming(tiny_vllm) == 1


async def test_abort_leaves_concurrent_requests_alone(tiny_vllm: Any) -> None:
    survivor: dict[str, Any] = {}

    async def full_run() -> None:
        chunks = [chunk async for chunk in tiny_vllm.stream(request(tiny_vllm, 60))]
        survivor["usage"] = chunks[-1].usage
        survivor["reasons"] = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]

    async def cancelled_run() -> None:
        with anyio.CancelScope() as scope:
            async for chunk in tiny_vllm.stream(request(tiny_vllm, LONG)):
                if chunk.choices:
                    scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(full_run)
        group.start_soon(cancelled_run)
    assert survivor["usage"].completion_tokens == 60
    assert survivor["reasons"] == ["length"]
    await engine_idle(tiny_vllm)
