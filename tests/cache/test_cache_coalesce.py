"""In-flight coalescing under concurrency, and what cancelling the leader (or everyone) does."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from llmrouter.cache import FlightCancelledError, MemoryBackend, ResponseCache
from llmrouter.cache.coalesce import Flight
from llmrouter.context import RequestContext
from llmrouter.errors import UpstreamError
from llmrouter.types import ChatChunk

pytestmark = pytest.mark.anyio

N = 20


async def test_identical_concurrent_requests_make_one_upstream_call(
    cache: ResponseCache, upstream: Any, helpers: Any
) -> None:
    gate = upstream.hold()
    ctxs = [helpers.new_ctx() for _ in range(N)]
    answers: list[Any] = []

    async def one(ctx: Any) -> None:
        answers.append(await cache.chat(ctx, helpers.chat_request(), upstream.call(ctx)))

    async with anyio.create_task_group() as tg:
        for ctx in ctxs:
            tg.start_soon(one, ctx)
        await helpers.wait_until(lambda: cache.stats.coalesced == N - 1)
        assert upstream.calls == 1 and len(cache.coalescer) == 1
        gate.set()
    assert upstream.calls == 1
    assert len(answers) == N and all(a == upstream.response() for a in answers)
    statuses = sorted(ctx.cache_status for ctx in ctxs)
    assert statuses == ["coalesced"] * (N - 1) + ["miss"]
    for ctx in ctxs:
        if ctx.cache_status == "coalesced":
            assert (ctx.cost, ctx.cost_source) == (0.0, "cache")
            assert ctx.usage == upstream.usage and ctx.deployment == "fake/upstream-model"
    assert len(cache.coalescer) == 0
    ctx = helpers.new_ctx()
    await cache.chat(ctx, helpers.chat_request(), upstream.call(ctx))
    assert ctx.cache_status == "hit" and upstream.calls == 1


async def test_without_coalescing_each_request_calls_upstream(upstream: Any, helpers: Any) -> None:
    cache = ResponseCache(MemoryBackend(), coalesce=False)
    gate = upstream.hold()
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            ctx = helpers.new_ctx()
            tg.start_soon(cache.chat, ctx, helpers.chat_request(), upstream.call(ctx))
        await helpers.wait_until(lambda: upstream.calls == 5)
        gate.set()
    assert upstream.calls == 5


async def test_streaming_followers_get_the_same_chunks_as_they_come(
    cache: ResponseCache, upstream: Any, helpers: Any
) -> None:
    gate = upstream.hold()  # upstream sends its first chunk, then waits
    received: list[list[Any]] = [[] for _ in range(N)]
    ctxs = [helpers.new_ctx() for _ in range(N)]

    async def consume(i: int) -> None:
        ctx = ctxs[i]
        async for chunk in cache.stream(ctx, helpers.chat_request(stream=True), upstream.stream(ctx)):
            received[i].append(chunk)

    async with anyio.create_task_group() as tg:
        for i in range(N):
            tg.start_soon(consume, i)
        # Live fan-out: everyone has the first chunk while upstream is still running.
        await helpers.wait_until(lambda: all(received) and cache.stats.coalesced == N - 1)
        assert upstream.completed == 0
        gate.set()
    assert upstream.calls == 1
    assert all(chunks == upstream.chunks() for chunks in received)
    followers = [c for c in ctxs if c.cache_status == "coalesced"]
    assert len(followers) == N - 1
    assert all(
        c.usage == upstream.usage and c.cost == 0.0 and c.first_token_at is not None for c in followers
    )


async def test_stream_and_non_stream_requests_coalesce(
    cache: ResponseCache, upstream: Any, helpers: Any
) -> None:
    gate = upstream.hold()
    leader, follower = helpers.new_ctx(), helpers.new_ctx()
    got: dict[str, Any] = {}

    async def stream_leader() -> None:
        got["chunks"] = [
            c async for c in cache.stream(leader, helpers.chat_request(stream=True), upstream.stream(leader))
        ]

    async def chat_follower() -> None:
        got["response"] = await cache.chat(follower, helpers.chat_request(), upstream.call(follower))

    async with anyio.create_task_group() as tg:
        tg.start_soon(stream_leader)
        await helpers.wait_until(lambda: upstream.calls == 1)
        tg.start_soon(chat_follower)
        await helpers.wait_until(lambda: cache.stats.coalesced == 1)
        gate.set()
    assert upstream.calls == 1 and follower.cache_status == "coalesced"
    assert got["chunks"] == upstream.chunks() and got["response"] == upstream.response()


async def test_a_stream_does_not_attend_a_non_streaming_call_in_progress(
    cache: ResponseCache, upstream: Any, helpers: Any
) -> None:
    # It could not take that call over if its first client left: it makes its own.
    gate = upstream.hold()
    leader, streamer = helpers.new_ctx(), helpers.new_ctx()
    got: dict[str, Any] = {}

    async def chat_leader() -> None:
        got["response"] = await cache.chat(leader, helpers.chat_request(), upstream.call(leader))

    async def stream_follower() -> None:
        got["chunks"] = [
            c
            async for c in cache.stream(
                streamer, helpers.chat_request(stream=True), upstream.stream(streamer)
            )
        ]

    async with anyio.create_task_group() as tg:
        tg.start_soon(chat_leader)
        await helpers.wait_until(lambda: upstream.calls == 1)
        tg.start_soon(stream_follower)
        await helpers.wait_until(lambda: upstream.calls == 2)
        gate.set()
    assert leader.cache_status == "miss" and streamer.cache_status == "miss" and cache.stats.coalesced == 0
    assert got["response"] == upstream.response() and got["chunks"] == upstream.chunks()
    assert len(cache.coalescer) == 0


async def test_leader_cancelled_its_call_stops_and_the_next_in_line_calls_for_the_rest(
    cache: ResponseCache, upstream: Any, helpers: Any
) -> None:
    gate = upstream.hold()
    leader = helpers.new_ctx()
    followers = [helpers.new_ctx() for _ in range(5)]
    answers: list[Any] = []
    leader_scope = anyio.CancelScope()

    async def lead() -> None:
        with leader_scope:
            await cache.chat(leader, helpers.chat_request(), upstream.call(leader))
            pytest.fail("the leader was cancelled; it cannot get an answer")

    async def follow(ctx: Any) -> None:
        answers.append(await cache.chat(ctx, helpers.chat_request(), upstream.call(ctx)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(lead)
        await helpers.wait_until(lambda: upstream.calls == 1)
        for ctx in followers:
            tg.start_soon(follow, ctx)
        await helpers.wait_until(lambda: cache.stats.coalesced == 5)
        leader_scope.cancel()  # the leader's client disconnects: its own call stops
        await helpers.wait_until(lambda: leader_scope.cancelled_caught)
        assert upstream.cancelled == 1
        await helpers.wait_until(lambda: upstream.calls == 2)  # the next in line calls again
        assert len(cache.coalescer) == 1  # for the four still waiting, and new arrivals
        gate.set()
    assert upstream.completed == 1 and upstream.calls == 2
    assert len(answers) == 5 and all(a == upstream.response() for a in answers)
    caller, *others = followers
    # The second call is the first follower's own: a miss, priced by the router.
    assert caller.cache_status == "miss" and caller.usage == upstream.usage
    assert caller.cost is None and caller.cost_source is None and caller.deployment == "fake/upstream-model"
    assert all(c.cache_status == "coalesced" and c.cost == 0.0 and c.usage == upstream.usage for c in others)
    assert all(c.deployment == "fake/upstream-model" for c in others)
    assert cache.stats.coalesced == 4 and cache.stats.misses == 2
    assert cache.snapshot()["entries"] == 1 and len(cache.coalescer) == 0


async def test_a_follower_cancelled_as_it_takes_over_hands_the_call_on(
    cache: ResponseCache, upstream: Any, helpers: Any
) -> None:
    gate = upstream.hold()
    scopes = [anyio.CancelScope() for _ in range(3)]
    contexts = [helpers.new_ctx() for _ in range(3)]
    answers: list[Any] = []

    async def one(i: int) -> None:
        with scopes[i]:
            answers.append(await cache.chat(contexts[i], helpers.chat_request(), upstream.call(contexts[i])))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, 0)
        await helpers.wait_until(lambda: upstream.calls == 1)
        tg.start_soon(one, 1)
        tg.start_soon(one, 2)
        await helpers.wait_until(lambda: cache.stats.coalesced == 2)
        # The leader and the first follower leave at once: the follower never calls.
        scopes[0].cancel()
        scopes[1].cancel()
        await helpers.wait_until(lambda: upstream.calls == 2)
        gate.set()
    assert answers == [upstream.response()] and contexts[2].cache_status == "miss"
    assert upstream.cancelled == 1 and upstream.completed == 1 and len(cache.coalescer) == 0


async def test_streaming_leader_closed_mid_stream_followers_get_everything(
    cache: ResponseCache, upstream: Any, helpers: Any
) -> None:
    gate = upstream.hold()
    leader = helpers.new_ctx()
    leader_stream = cache.stream(leader, helpers.chat_request(stream=True), upstream.stream(leader))
    first = await leader_stream.__anext__()
    received: list[list[Any]] = [[] for _ in range(3)]

    async def follow(i: int) -> None:
        ctx = helpers.new_ctx()
        async for chunk in cache.stream(ctx, helpers.chat_request(stream=True), upstream.stream(ctx)):
            received[i].append(chunk)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(follow, i)
        await helpers.wait_until(lambda: all(received))
        await leader_stream.aclose()  # the leader's client goes away after one chunk
        assert upstream.cancelled == 0
        gate.set()
    assert first == upstream.chunks()[0]
    assert all(chunks == upstream.chunks() for chunks in received)
    assert upstream.calls == 1 and upstream.completed == 1


async def test_all_attendees_cancelled_stops_upstream(
    cache: ResponseCache, upstream: Any, helpers: Any
) -> None:
    upstream.hold()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                ctx = helpers.new_ctx()
                tg.start_soon(cache.chat, ctx, helpers.chat_request(), upstream.call(ctx))
            await helpers.wait_until(lambda: cache.stats.coalesced == 2)
            scope.cancel()
    # The leader's own call was cancelled with it; nobody was left to call again.
    assert upstream.cancelled == 1 and upstream.completed == 0
    assert len(cache.coalescer) == 0 and cache.snapshot()["entries"] == 0
    upstream.gate = None
    ctx = helpers.new_ctx()
    await cache.chat(ctx, helpers.chat_request(), upstream.call(ctx))
    assert ctx.cache_status == "miss" and upstream.calls == 2


async def test_all_streams_closed_closes_upstream(cache: ResponseCache, upstream: Any, helpers: Any) -> None:
    upstream.hold()
    streams = []
    for _ in range(3):
        ctx = helpers.new_ctx()
        stream = cache.stream(ctx, helpers.chat_request(stream=True), upstream.stream(ctx))
        await stream.__anext__()
        streams.append(stream)
    assert upstream.calls == 1
    for stream in streams[:-1]:
        await stream.aclose()
    assert upstream.cancelled == 0  # one listener is left
    await streams[-1].aclose()
    assert upstream.cancelled == 1 and len(cache.coalescer) == 0


async def test_an_upstream_error_reaches_every_attendee_and_is_not_stored(
    cache: ResponseCache, upstream: Any, helpers: Any
) -> None:
    gate = upstream.hold()
    upstream.error = UpstreamError("upstream exploded")
    errors: list[BaseException] = []

    async def one() -> None:
        ctx = helpers.new_ctx()
        try:
            await cache.chat(ctx, helpers.chat_request(), upstream.call(ctx))
        except UpstreamError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one)
        await helpers.wait_until(lambda: cache.stats.coalesced == 3)
        gate.set()
    assert len(errors) == 4 and upstream.calls == 1
    assert cache.snapshot()["entries"] == 0 and len(cache.coalescer) == 0
    upstream.error = None
    ctx = helpers.new_ctx()
    await cache.chat(ctx, helpers.chat_request(), upstream.call(ctx))
    assert ctx.cache_status == "miss" and upstream.calls == 2


async def test_closing_the_cache_releases_attendees(
    cache: ResponseCache, upstream: Any, helpers: Any
) -> None:
    upstream.hold()
    failures: list[FlightCancelledError] = []
    leader = helpers.new_ctx()

    async def follow() -> None:
        ctx = helpers.new_ctx()
        try:
            await cache.chat(ctx, helpers.chat_request(), upstream.call(ctx))
        except FlightCancelledError as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.chat, leader, helpers.chat_request(), upstream.call(leader))
        await helpers.wait_until(lambda: upstream.calls == 1)
        tg.start_soon(follow)
        await helpers.wait_until(lambda: cache.stats.coalesced == 1)
        await cache.aclose()
        await helpers.wait_until(lambda: failures)
        assert len(failures) == 1 and failures[0].http_status == 503
        # The leader's call is its own request's, as without a cache: it ends with it.
        assert upstream.cancelled == 0
        tg.cancel_scope.cancel()
    assert upstream.cancelled == 1 and len(cache.coalescer) == 0


async def test_closing_the_cache_cancels_a_stream_flight(
    cache: ResponseCache, upstream: Any, helpers: Any
) -> None:
    upstream.hold()
    failures: list[FlightCancelledError] = []

    async def one() -> None:
        ctx = helpers.new_ctx()
        try:
            async for _chunk in cache.stream(ctx, helpers.chat_request(stream=True), upstream.stream(ctx)):
                pass
        except FlightCancelledError as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(2):
            tg.start_soon(one)
        await helpers.wait_until(lambda: cache.stats.coalesced == 1)
        await cache.aclose()
    assert len(failures) == 2 and failures[0].http_status == 503
    assert upstream.cancelled == 1


async def test_a_flight_wakes_its_waiters_and_allocates_nothing_per_unwatched_chunk() -> None:
    flight = Flight("k", RequestContext(), streaming=True)
    chunk = ChatChunk(id="c", created=0, model="m", choices=[])
    for _ in range(3):
        flight.push(chunk)  # nobody waits: nothing is made for these
    assert flight._waiters == []
    seen: list[ChatChunk] = []

    async def read() -> None:
        async for batch in flight.batches():
            seen.extend(batch)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await anyio.wait_all_tasks_blocked()
            assert len(seen) == 3 and len(flight._waiters) == 1  # the reader waits for more
            flight.push(chunk)
            await anyio.wait_all_tasks_blocked()
            assert len(seen) == 4 and len(flight._waiters) == 1
            flight.finish()
    assert len(seen) == 4 and flight.done
