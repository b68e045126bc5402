"""Review regressions for coalescing under cancellation: who pays for a flight when its
attendees leave at awkward moments, and per-request state that must not outlive them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from llmrouter.cache import MemoryBackend, ResponseCache
from llmrouter.config import Deployment, Price
from llmrouter.context import RequestContext
from llmrouter.cost import usage_cost
from llmrouter.router import Router
from llmrouter.telemetry.hooks import TelemetryHooks
from llmrouter.testing.scripted import ScriptedProvider, Step
from llmrouter.types import ChatChunk, ChatRequest, ChatResponse, Usage

pytestmark = pytest.mark.anyio

USAGE = Usage(prompt_tokens=1000, completion_tokens=500, total_tokens=1500)
PRICE = Price(input=1.0, output=2.0)
FULL_COST = usage_cost(USAGE, PRICE)


class HeldAfterFirstChunk(ScriptedProvider):
    """Streams the first chunk, then waits for ``gate`` before the rest."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = anyio.Event()

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        sent = 0
        async for chunk in super().stream(request):
            if sent == 1:
                await self.gate.wait()
            sent += 1
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
    # Counted as the miss it is billed as (as when a non-streaming attendee takes a call
    # over): the snapshot's misses and hit ratio match the ledger.
    assert (snapshot["misses"], snapshot["coalesced"], snapshot["hit_ratio"]) == (2, 0, 0.0)
    assert provider.record.calls == 1
    assert origin.status == "cancelled" and origin.usage is not None and origin.usage.estimated
    assert follower.cache_status == "miss", "the follower inherited the bill"
    assert follower.usage == USAGE
    assert follower.cost == pytest.approx(FULL_COST) and follower.cost_source == "price_table"


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
