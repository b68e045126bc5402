"""Review regressions for coalescing under cancellation: who pays for a flight when its
attendees leave at awkward moments, and per-request state that must not outlive them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import anyio
import pytest

from llmrouter.cache import MemoryBackend, ResponseCache
from llmrouter.config import Deployment, Price
from llmrouter.context import RequestContext
from llmrouter.cost import usage_cost
from llmrouter.errors import UpstreamError
from llmrouter.router import Router
from llmrouter.telemetry.hooks import TelemetryHooks
from llmrouter.testing.scripted import ScriptedProvider, Step
from llmrouter.tokens import count_text
from llmrouter.types import ChatChunk, ChatRequest, ChatResponse, Usage

pytestmark = pytest.mark.anyio

USAGE = Usage(prompt_tokens=1000, completion_tokens=500, total_tokens=1500)
PRICE = Price(input=1.0, output=2.0)
FULL_COST = usage_cost(USAGE, PRICE)


class HeldAfterFirstChunk(ScriptedProvider):
    """Streams the first chunk (the first ``free``), then waits for ``gate`` before the rest."""

    def __init__(self, *args: Any, free: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = anyio.Event()
        self.free = free

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        sent = 0
        async for chunk in super().stream(request):
            if sent == self.free:
                await self.gate.wait()
            sent += 1
            yield chunk


class HeldBeforeAnswering(ScriptedProvider):
    """Waits for ``gate`` before it streams (or fails)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = anyio.Event()

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        await self.gate.wait()
        async for chunk in super().stream(request):
            yield chunk


class CancelsOnAnswer(ScriptedProvider):
    """Cancels ``scope`` (the caller's) just before it answers: the caller is cancelled
    in the same loop step in which the shared call completes."""

    scope: anyio.CancelScope | None = None

    async def chat(self, request: ChatRequest) -> ChatResponse:
        response = await super().chat(request)
        if self.scope is not None:
            self.scope.cancel()
        return response


def body(**fields: Any) -> dict[str, Any]:
    return {
        "model": "g",
        "messages": [{"role": "user", "content": "Capital of France?"}],
        "temperature": 0,
        **fields,
    }


def make(provider: ScriptedProvider, hooks: tuple[Any, ...] = ()) -> tuple[Router, ResponseCache]:
    cache = ResponseCache(MemoryBackend(), ttl=60)
    router = Router(hooks=hooks, cache=cache)
    router.add_deployment("g", provider, Deployment(provider="scripted", model="tiny", price=PRICE))
    return router, cache


async def wait_until(condition: Any) -> None:
    with anyio.fail_after(5):
        while not condition():  # noqa: ASYNC110 - a bounded poll of plain state, no event to wait on
            await anyio.sleep(0.005)


async def test_the_next_in_line_pays_the_whole_call_not_the_leavers_part() -> None:
    provider = HeldAfterFirstChunk("tiny", default=Step(text="Paris is the capital of France.", usage=USAGE))
    router, cache = make(provider)
    origin, follower = RequestContext(), RequestContext()
    async with router:
        first = router.stream(body(), context=origin)
        await first.__anext__()
        second = router.stream(body(), context=follower)
        await second.__anext__()  # replayed from the flight: the follower attends it
        assert cache.stats.coalesced == 1
        await first.aclose()  # the client that launched the flight leaves early
        provider.gate.set()
        with anyio.fail_after(5):
            async for _chunk in second:
                pass
    snapshot = cache.snapshot()
    await cache.aclose()
    # One miss for the one upstream call, counted for the request billed for it: the
    # snapshot's misses and hit ratio match the ledger.
    assert (snapshot["misses"], snapshot["coalesced"], snapshot["hit_ratio"]) == (1, 1, 0.5)
    assert provider.record.calls == 1
    # The launcher handed its bill on whole: the tokens it saw are not billed twice.
    assert origin.status == "cancelled" and origin.usage is not None and origin.usage.estimated
    assert (origin.cache_status, origin.cost, origin.cost_source) == ("coalesced", 0.0, "cache")
    assert follower.cache_status == "miss", "the follower inherited the bill"
    assert follower.usage == USAGE
    assert follower.cost == pytest.approx(FULL_COST) and follower.cost_source == "price_table"


def assert_pays_for_what_was_produced(ctx: RequestContext, produced: str) -> None:
    """``ctx`` holds the flight's bill: a miss priced for the prompt and the output the
    flight produced (counted, as for any cancelled stream), whatever it read of it."""
    assert ctx.status in ("cancelled", "error") and ctx.cache_status == "miss"
    assert ctx.usage is not None and ctx.usage.estimated
    assert ctx.usage.completion_tokens == count_text(produced, "tiny")
    assert ctx.usage.prompt_tokens == ctx.prompt_tokens_estimate > 0
    assert ctx.cost_source == "price_table" and ctx.cost == pytest.approx(usage_cost(ctx.usage, PRICE))


async def test_the_last_to_leave_an_unfinished_stream_pays_for_what_it_produced_once() -> None:
    provider = HeldAfterFirstChunk(
        "tiny", default=Step(text="Paris is the capital of France.", usage=USAGE), free=3
    )
    router, cache = make(provider)
    origin, middle, last = RequestContext(), RequestContext(), RequestContext()
    async with router:
        first = router.stream(body(), context=origin)
        for _ in range(3):  # all the upstream sends before it is held
            await first.__anext__()
        streams = [router.stream(body(), context=ctx) for ctx in (middle, last)]
        for stream in streams:
            await stream.__anext__()  # each reads less of it than the flight produced
        await first.aclose()  # the bill passes to the next in line, and on
        for stream in streams:
            await stream.aclose()
    await cache.aclose()
    assert provider.record.calls == 1 and provider.record.cancelled == 1, "the last to leave stopped it"
    assert_pays_for_what_was_produced(last, "Paris is the")
    for ctx in (origin, middle):
        assert (ctx.cache_status, ctx.cost, ctx.cost_source) == ("coalesced", 0.0, "cache")
    assert cache.stats.misses == 1 and cache.stats.coalesced == 2


async def test_a_json_request_left_holding_a_streams_bill_pays_for_what_it_produced() -> None:
    provider = HeldAfterFirstChunk(
        "tiny", default=Step(text="Paris is the capital of France.", usage=USAGE), free=2
    )
    router, cache = make(provider)
    origin, waiter = RequestContext(), RequestContext()
    async with router:
        first = router.stream(body(), context=origin)
        for _ in range(2):
            await first.__anext__()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(router.chat, body(), context=waiter))  # attends the stream
            await wait_until(lambda: cache.stats.coalesced == 1)
            await first.aclose()
            tg.cancel_scope.cancel()  # nothing read, but the upstream had produced output
    await cache.aclose()
    assert provider.record.calls == 1 and provider.record.cancelled == 1
    assert_pays_for_what_was_produced(waiter, "Paris is")
    assert (origin.cache_status, origin.cost) == ("coalesced", 0.0)


async def test_a_stream_that_fails_after_its_launcher_left_is_billed_to_the_next_in_line() -> None:
    step = Step(text="Paris is the capital of France.", error=UpstreamError("boom"), fail_after_chunks=3)
    provider = HeldAfterFirstChunk("tiny", default=step)
    router, cache = make(provider)
    origin, follower = RequestContext(), RequestContext()
    async with router:
        first = router.stream(body(), context=origin)
        await first.__anext__()
        second = router.stream(body(), context=follower)
        await second.__anext__()
        await first.aclose()
        provider.gate.set()
        with anyio.fail_after(5), pytest.raises(UpstreamError):
            async for _chunk in second:
                pass
    await cache.aclose()
    assert_pays_for_what_was_produced(follower, "Paris is the")
    assert (origin.cache_status, origin.cost) == ("coalesced", 0.0)


async def test_a_launcher_left_last_pays_for_what_its_followers_read_too() -> None:
    provider = HeldAfterFirstChunk(
        "tiny", default=Step(text="Paris is the capital of France.", usage=USAGE), free=3
    )
    router, cache = make(provider)
    origin, follower = RequestContext(), RequestContext()
    async with router:
        first = router.stream(body(), context=origin)
        await first.__anext__()  # the launcher reads one of the three chunks produced
        second = router.stream(body(), context=follower)
        for _ in range(3):
            await second.__anext__()
        await second.aclose()
        await first.aclose()  # the last to leave, still holding its bill
    await cache.aclose()
    assert provider.record.calls == 1 and provider.record.cancelled == 1
    assert_pays_for_what_was_produced(origin, "Paris is the")
    assert (follower.cache_status, follower.cost) == ("coalesced", 0.0)


async def test_a_launcher_nobody_joined_is_billed_what_it_received() -> None:
    provider = HeldAfterFirstChunk(
        "tiny", default=Step(text="Paris is the capital of France.", usage=USAGE), free=3
    )
    router, cache = make(provider)
    ctx = RequestContext()
    async with router:
        stream = router.stream(body(), context=ctx)
        await stream.__anext__()
        await wait_until(lambda: provider.record.chunks_sent > 3)  # the flight produced three
        await stream.aclose()
    await cache.aclose()
    assert provider.record.cancelled == 1
    assert ctx.cache_status == "miss" and ctx.usage is not None
    assert ctx.usage.completion_tokens == count_text("Paris", "tiny"), "as without a cache"


async def test_a_payer_that_stops_reading_a_completed_flight_without_usage_pays_all_of_it() -> None:
    text = "Paris is the capital of France."
    provider = HeldAfterFirstChunk("tiny", default=Step(text=text, usage=False))
    router, cache = make(provider)
    origin, follower = RequestContext(), RequestContext()
    async with router:
        first = router.stream(body(), context=origin)
        await first.__anext__()
        second = router.stream(body(), context=follower)
        await second.__anext__()
        await first.aclose()  # the follower holds the bill now
        provider.gate.set()
        await wait_until(lambda: provider.record.completed == 1 and len(cache.coalescer) == 0)
        await second.aclose()  # having read one chunk of the completed call
    await cache.aclose()
    assert follower.cache_status == "miss" and follower.usage is not None
    assert follower.usage.completion_tokens == count_text(text, "tiny")
    assert follower.cost_source == "price_table"
    assert follower.cost == pytest.approx(usage_cost(follower.usage, PRICE))


async def test_a_stream_failing_before_its_first_chunk_bills_its_next_in_line_nothing() -> None:
    provider = HeldBeforeAnswering("tiny", default=Step(error=UpstreamError("boom")))
    router, cache = make(provider)
    origin, follower = RequestContext(), RequestContext()
    launcher = anyio.CancelScope()

    async def launch() -> None:
        with launcher:
            async for _chunk in router.stream(body(), context=origin):
                pass

    async def follow() -> None:
        with pytest.raises(UpstreamError):
            async for _chunk in router.stream(body(), context=follower):
                pass

    async with router, anyio.create_task_group() as tg:
        tg.start_soon(launch)
        await wait_until(lambda: len(cache.coalescer) == 1)
        tg.start_soon(follow)
        await wait_until(lambda: cache.stats.coalesced == 1)
        launcher.cancel()  # the bill passes to the follower
        await wait_until(lambda: origin.status == "cancelled")
        provider.gate.set()  # upstream fails before its first chunk
    await cache.aclose()
    # As for a stream failing alone: no deployment answered, nothing is billed.
    assert (follower.status, follower.cache_status) == ("error", "miss")
    assert follower.usage is None and follower.cost == 0.0 and follower.cost_source is None
    assert cache.stats.misses == 1 and cache.stats.coalesced == 1


async def test_a_caller_cancelled_as_its_call_answers_is_answered_and_pays() -> None:
    provider = CancelsOnAnswer("tiny", default=Step(text="Paris.", usage=USAGE))
    router, cache = make(provider)
    ctx = RequestContext()
    async with router:
        with anyio.fail_after(5), anyio.CancelScope() as scope:
            provider.scope = scope
            await router.chat(body(), context=ctx)
        # The answer was in hand, stored: the next identical request is a free hit.
        hit = RequestContext()
        await router.chat(body(), context=hit)
    await cache.aclose()
    assert hit.cache_status == "hit" and provider.record.calls == 1
    assert ctx.cache_status == "miss" and ctx.usage == USAGE
    assert ctx.cost == pytest.approx(FULL_COST), "the upstream call completed: somebody must pay for it"


async def test_a_stream_closed_after_its_flight_completed_pays_the_whole_call() -> None:
    provider = ScriptedProvider("tiny", default=Step(text="Paris is the capital of France.", usage=USAGE))
    router, cache = make(provider)
    ctx = RequestContext()
    async with router:
        stream = router.stream(body(), context=ctx)
        await stream.__anext__()
        await wait_until(lambda: provider.record.completed == 1 and len(cache.coalescer) == 0)
        await stream.aclose()
        hit = RequestContext()
        await router.chat(body(), context=hit)
    await cache.aclose()
    assert hit.cache_status == "hit"
    assert ctx.status == "cancelled" and ctx.usage == USAGE
    assert ctx.cost == pytest.approx(FULL_COST)


@pytest.mark.parametrize("traced", [False, True])
async def test_telemetry_keeps_no_state_for_a_launcher_that_left(traced: bool) -> None:
    tracer_provider = None
    if traced:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    telemetry = TelemetryHooks(tracer_provider=tracer_provider, log_requests=False)
    provider = HeldAfterFirstChunk("tiny", default=Step(text="Paris is the capital of France.", usage=USAGE))
    router, cache = make(provider, hooks=(telemetry,))
    async with router:
        first = router.stream(body(), context=RequestContext())
        await first.__anext__()
        second = router.stream(body(), context=RequestContext())
        await second.__anext__()
        await first.aclose()
        provider.gate.set()
        with anyio.fail_after(5):
            async for _chunk in second:
                pass
    await cache.aclose()
    assert provider.record.completed == 1
    assert telemetry._attempt_started == {}
    assert telemetry._spans == {}


async def test_a_cancelled_follower_leaves_the_launcher_alone() -> None:
    provider = HeldAfterFirstChunk("tiny", default=Step(text="Paris is the capital of France.", usage=USAGE))
    router, cache = make(provider)
    origin, follower = RequestContext(), RequestContext()
    async with router:
        first = router.stream(body(), context=origin)
        await first.__anext__()
        with anyio.fail_after(5), anyio.CancelScope() as scope:
            async for _chunk in router.stream(body(), context=follower):
                scope.cancel()  # the follower's client goes away after its first chunk
        provider.gate.set()
        with anyio.fail_after(5):
            async for _chunk in first:
                pass
    await cache.aclose()
    assert provider.record.calls == 1 and provider.record.cancelled == 0 and provider.record.completed == 1
    assert follower.status == "cancelled" and follower.cost == 0.0 and follower.cost_source == "cache"
    assert origin.status == "ok" and origin.usage == USAGE and origin.cost == pytest.approx(FULL_COST)
