"""Cancellation reaches the upstream: the fake upstream records its connection closing.

The bound the service promises is "the upstream sees its connection closed within 250 ms
of the client going away"; these tests hold the provider to it (loopback, so the margin
is wide).
"""

import time
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
from llmrouter_remote import RemoteProvider

from llmrouter.testing.upstream import FakeUpstream, RecordedRequest
from llmrouter.types import decode_chat_request, decode_completion_request

pytestmark = pytest.mark.anyio

BOUND_S = 0.25


@pytest.fixture(scope="module")
def slow_upstream() -> Iterator[FakeUpstream]:
    # 200 chunks at 20 ms: four seconds per answer, far longer than any test waits.
    with FakeUpstream(chunks=200, delay_ms=20) as upstream:
        yield upstream


@pytest.fixture
async def remote(slow_upstream: FakeUpstream) -> AsyncIterator[RemoteProvider]:
    slow_upstream.reset()
    async with RemoteProvider("fake-model", base_url=slow_upstream.base_url) as provider:
        yield provider


def chat(stream: bool = False):
    return decode_chat_request(
        {
            "model": "fake-model",
            "messages": [{"role": "user", "content": "go"}],
            "stream": stream,
            "max_tokens": 1000,
        }
    )


async def assert_closed_within_bound(record: RecordedRequest, left_at: float) -> None:
    assert await record.wait_disconnected(2.0), "the upstream never saw the connection close"
    assert record.completed_at is None, "the upstream finished the answer: nothing was cancelled"
    assert record.disconnected_at is not None
    lag = record.disconnected_at - left_at
    assert lag < BOUND_S, f"the upstream saw the connection close {lag * 1000:.0f} ms after the client left"


async def test_stream_aclose_closes_the_upstream_connection(
    remote: RemoteProvider, slow_upstream: FakeUpstream
) -> None:
    stream = remote.stream(chat(stream=True))
    await stream.__anext__()
    await stream.__anext__()
    (record,) = await slow_upstream.wait_for_requests(1)
    left_at = time.monotonic()
    await stream.aclose()
    await assert_closed_within_bound(record, left_at)
    assert record.chunks_sent < 200


async def test_cancelled_stream_closes_the_upstream_connection(
    remote: RemoteProvider, slow_upstream: FakeUpstream
) -> None:
    with anyio.move_on_after(0.3) as scope:
        async for _ in remote.stream(chat(stream=True)):
            pass
    left_at = time.monotonic()
    assert scope.cancelled_caught
    (record,) = await slow_upstream.wait_for_requests(1)
    await assert_closed_within_bound(record, left_at)


async def test_cancelled_chat_closes_the_upstream_connection(
    remote: RemoteProvider, slow_upstream: FakeUpstream
) -> None:
    with anyio.move_on_after(0.3) as scope:
        await remote.chat(chat())
    left_at = time.monotonic()
    assert scope.cancelled_caught
    (record,) = await slow_upstream.wait_for_requests(1)
    await assert_closed_within_bound(record, left_at)


async def test_cancelled_completion_stream_closes_the_upstream_connection(
    remote: RemoteProvider, slow_upstream: FakeUpstream
) -> None:
    request = decode_completion_request({"model": "fake-model", "prompt": "go", "max_tokens": 1000})
    stream = remote.stream_complete(request)
    await stream.__anext__()
    left_at = time.monotonic()
    await stream.aclose()
    (record,) = await slow_upstream.wait_for_requests(1)
    await assert_closed_within_bound(record, left_at)


async def test_task_group_cancellation_while_waiting_for_first_byte(slow_upstream: FakeUpstream) -> None:
    slow_upstream.reset()
    slow_upstream.enqueue("hang")
    async with RemoteProvider("fake-model", base_url=slow_upstream.base_url) as provider:
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                async for _ in provider.stream(chat(stream=True)):
                    pass

            tg.start_soon(consume)
            (record,) = await slow_upstream.wait_for_requests(1)
            left_at = time.monotonic()
            tg.cancel_scope.cancel()
        await assert_closed_within_bound(record, left_at)
        # The pool is still good for the next request.
        slow_upstream.enqueue("no_usage")
        response = await provider.chat(
            decode_chat_request(
                {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
            )
        )
        assert response.choices[0].finish_reason == "length"
