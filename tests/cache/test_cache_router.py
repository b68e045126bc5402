"""The cache through the Router: hits bill zero, streams replay, coalescing and cancellation
with the real dispatch path (an in-test provider that can be held at a gate)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest

from llmrouter.cache import MemoryBackend, ResponseCache
from llmrouter.config import Deployment, Price
from llmrouter.context import RequestContext
from llmrouter.hooks import RouterHooks
from llmrouter.router import Router
from llmrouter.testing.scripted import ScriptedProvider, Step
from llmrouter.types import ChatChunk, ChatRequest, ChatResponse, Usage, decode_chat_request

pytestmark = pytest.mark.anyio

USAGE = Usage(prompt_tokens=1000, completion_tokens=500, total_tokens=1500)


class GatedProvider(ScriptedProvider):
    """Answers only once ``gate`` is set (when one is)."""

    gate: anyio.Event | None = None

    async def _held(self) -> None:
        if self.gate is not None:
            try:
                await self.gate.wait()
            except anyio.get_cancelled_exc_class():
                self.record.cancelled += 1
                raise

    async def chat(self, request: ChatRequest) -> ChatResponse:
        await self._held()
        return await super().chat(request)

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        await self._held()
        async for chunk in super().stream(request):
            yield chunk


class Ledger(RouterHooks):
    """Records what accounting would see, once per request."""

    def __init__(self) -> None:
        self.rows: list[tuple[str | None, str | None, float | None, str | None]] = []

    async def after_request(self, ctx: RequestContext) -> None:
        self.rows.append((ctx.status, ctx.cache_status, ctx.cost, ctx.cost_source))


@pytest.fixture
def provider() -> GatedProvider:
    return GatedProvider("tiny", default=Step(text="Paris is the capital of France.", usage=USAGE))


@pytest.fixture
async def routed(provider: GatedProvider) -> AsyncIterator[tuple[Router, ResponseCache, Ledger]]:
    cache = ResponseCache(MemoryBackend(), ttl=60)
    ledger = Ledger()
    router = Router(hooks=[ledger], cache=cache)
    router.add_deployment(
        "g", provider, Deployment(provider="scripted", model="tiny", price=Price(input=1.0, output=2.0))
    )
    async with router:
        yield router, cache, ledger
    await cache.aclose()


def body(**fields: Any) -> dict[str, Any]:
    return {
        "model": "g",
        "messages": [{"role": "user", "content": "Capital of France?"}],
        "temperature": 0,
        **fields,
    }


async def test_hit_through_the_router_bills_zero(routed: Any, provider: GatedProvider) -> None:
    router, _, ledger = routed
    first = await router.chat(body())
    ctx = RequestContext()
    second = await router.chat(body(user="bob"), context=ctx)
    assert provider.record.calls == 1
    assert second.choices == first.choices
    assert ctx.cache_status == "hit" and ctx.usage == USAGE
    assert ledger.rows == [("ok", "miss", pytest.approx(0.002), "price_table"), ("ok", "hit", 0.0, "cache")]


async def test_uncacheable_requests_bypass(routed: Any, provider: GatedProvider) -> None:
    router, _, ledger = routed
    for _ in range(2):
        await router.chat(body(temperature=0.8))
    assert provider.record.calls == 2
    assert [row[1] for row in ledger.rows] == ["bypass", "bypass"]


async def test_a_request_the_cache_cannot_key_is_passed_through_and_settled(
    routed: Any, provider: GatedProvider
) -> None:
    # A library caller's request with a value msgspec cannot encode: the key fails
    # before the stream starts, which must neither fail the request nor skip its settlement.
    router, cache, ledger = routed
    request = msgspec.structs.replace(decode_chat_request(body(stream=True)), extra={"tag": object()})
    chunks = [c async for c in router.stream(request)]
    answer = await router.chat(request)
    text = "Paris is the capital of France."
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert answer.choices[0].message.content == text
    assert ledger.rows == [("ok", "bypass", pytest.approx(0.002), "price_table")] * 2
    assert cache.stats.errors == 2 and provider.record.calls == 2


async def test_stream_replay_through_the_router(routed: Any, provider: GatedProvider) -> None:
    router, _, ledger = routed
    first = [c async for c in router.stream(body(stream=True, stream_options={"include_usage": True}))]
    again = [c async for c in router.stream(body(stream=True, stream_options={"include_usage": True}))]
    plain = [c async for c in router.stream(body(stream=True))]
    assert provider.record.calls == 1
    assert again == first and first[-1].usage == USAGE
    assert plain == first[:-1]  # the router strips the usage chunk the client did not ask for
    assert [row[1] for row in ledger.rows] == ["miss", "hit", "hit"]
    assert ledger.rows[1][2:] == (0.0, "cache")
    non_streamed = await router.chat(body())
    assert non_streamed.choices[0].message.content == "Paris is the capital of France."


async def test_a_streamed_hit_on_an_answer_without_usage_is_counted_like_a_json_hit(
    routed: Any, provider: GatedProvider
) -> None:
    # Stored without usage: a stream hit gets no usage chunk of zeros, so the router
    # counts its tokens as it does for the non-streaming hit of the same entry.
    router, _, _ = routed
    provider.default = Step(text="Paris is the capital of France.", usage=False)
    await router.chat(body())
    json_hit, stream_hit = RequestContext(), RequestContext()
    await router.chat(body(), context=json_hit)
    options = {"include_usage": True}
    chunks = [c async for c in router.stream(body(stream=True, stream_options=options), context=stream_hit)]
    assert provider.record.calls == 1
    assert (json_hit.cache_status, stream_hit.cache_status) == ("hit", "hit")
    assert stream_hit.usage is not None and stream_hit.usage.completion_tokens > 0
    assert stream_hit.usage == json_hit.usage
    assert all(c.usage is None for c in chunks)  # as on a streamed miss from this upstream


async def test_twenty_concurrent_requests_one_provider_call(routed: Any, provider: GatedProvider) -> None:
    router, cache, ledger = routed
    provider.gate = anyio.Event()
    answers: list[ChatResponse] = []

    async def one() -> None:
        answers.append(await router.chat(body()))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)
        for _ in range(1000):  # bounded wait for every request to join the flight
            if cache.stats.coalesced == 19:
                break
            await anyio.sleep(0.01)
        provider.gate.set()
    assert provider.record.calls == 1 and len(answers) == 20
    assert len({a.choices[0].message.content for a in answers}) == 1
    costs = sorted(row[2] for row in ledger.rows)
    assert costs == [0.0] * 19 + [pytest.approx(0.002)]


async def test_leader_cancelled_through_the_router(routed: Any, provider: GatedProvider) -> None:
    router, cache, ledger = routed
    provider.gate = anyio.Event()
    answers: list[ChatResponse] = []
    leader_scope = anyio.CancelScope()

    async def lead() -> None:
        with leader_scope:
            await router.chat(body())

    async def follow() -> None:
        answers.append(await router.chat(body()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(lead)
        for _ in range(1000):  # the leader's flight is up (held at the provider's gate)
            if len(cache.coalescer) == 1:
                break
            await anyio.sleep(0.01)
        for _ in range(3):
            tg.start_soon(follow)
        for _ in range(1000):
            if cache.stats.coalesced == 3:
                break
            await anyio.sleep(0.01)
        leader_scope.cancel()
        for _ in range(1000):
            if ledger.rows:
                break
            await anyio.sleep(0.01)
        # The leader's own call stopped with it; the first follower calls again.
        assert ledger.rows[0][0] == "cancelled" and provider.record.cancelled == 1
        provider.gate.set()
    assert len(answers) == 3 and provider.record.calls == 1 and provider.record.completed == 1
    # The cancelled call answered nothing, but its upstream had read the prompt: billed
    # that, as estimated for pricing ($1 a million input tokens).
    assert ledger.rows[0][2:] == (pytest.approx(10 / 1e6), "price_table")
    followers = ledger.rows[1:]
    # Billed once, to the follower that called, at the price-table cost of the whole answer.
    assert sorted(row[2] for row in followers) == [0.0, 0.0, pytest.approx(0.002)]


async def test_every_stream_closed_stops_the_provider(routed: Any, provider: GatedProvider) -> None:
    router, cache, _ = routed
    provider.default = Step(text="one two three four", usage=USAGE, chunk_delay=30)
    streams = [router.stream(body(stream=True)) for _ in range(3)]
    for stream in streams:
        await stream.__anext__()
    assert provider.record.calls == 1 and cache.stats.coalesced == 2
    with anyio.fail_after(20):  # generous: closing must not wait out the 30 s chunk delay
        for stream in streams:
            await stream.aclose()
    assert provider.record.cancelled == 1 and len(cache.coalescer) == 0


async def test_group_settings_given_to_the_cache_before_the_router_are_kept() -> None:
    """docs/cache.md configures a group on the cache, then builds the Router with it: a
    group with no ``cache:`` of its own in the config must not undo that."""
    from llmrouter.config import Config, GroupCache, ModelGroup

    cache = ResponseCache(MemoryBackend(), ttl=600)
    cache.configure_group("summarizer", GroupCache(ttl=86400, cache_all=True))
    router = Router(Config(models=[ModelGroup(name="summarizer", deployments=[])]), cache=cache)
    router.add_deployment("summarizer", ScriptedProvider("m"))
    settings = GroupCache(ttl=86400, cache_all=True)
    assert cache._groups["summarizer"] == settings
    cache.configure_group("later", settings)
    router.add_group(ModelGroup(name="later", deployments=[]))
    assert cache._groups["later"] == settings
    await cache.aclose()


async def test_a_library_callers_max_age_of_zero_is_no_cache() -> None:
    """As ``Cache-Control: max-age=0`` is over HTTP (docs/cache.md)."""
    cache = ResponseCache(MemoryBackend(), ttl=600)
    router = Router(cache=cache)
    router.add_deployment("m", ScriptedProvider("m"))
    request = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "x"}]}
    async with router:
        await router.chat(request)
        ctx = RequestContext(max_age=0.0)
        await router.chat(request, context=ctx)
    await cache.aclose()
    assert ctx.cache_status == "bypass"


class AllowList:
    """A key's allow-list, as the router reads one from accounting's principal."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def allows_model(self, *names: str) -> bool:
        return any(name in self.names for name in names)


@pytest.fixture
async def fallback_routed() -> AsyncIterator[tuple[Router, ResponseCache, GatedProvider]]:
    """``primary`` is down and falls back to ``backup`` (held at a gate when one is set)."""
    from llmrouter.config import ModelGroup
    from llmrouter.errors import UpstreamError

    cache = ResponseCache(MemoryBackend(), ttl=60)
    router = Router(cache=cache)
    backup = GatedProvider("backup-model", default=Step(text="backup answer", usage=USAGE))
    router.add_deployment("backup", backup)
    router.add_deployment(
        "primary", ScriptedProvider(default=Step(error=UpstreamError("down", retryable=False)))
    )
    router.groups["primary"].config = ModelGroup(name="primary", deployments=[], fallbacks=["backup"])
    async with router:
        yield router, cache, backup
    await cache.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_fallbacks_stored_answer_is_not_served_to_a_key_that_may_not_use_it(
    fallback_routed: Any, stream: bool
) -> None:
    """A key allowed only ``primary`` fails as it does without the cache; the answer
    ``backup`` gave a key allowed both is still a hit for such keys."""
    from llmrouter.errors import LLMRouterError

    router, _, backup = fallback_routed
    request = body(model="primary", stream=stream)

    async def ask(ctx: RequestContext) -> str:
        if not stream:
            return (await router.chat(request, context=ctx)).choices[0].message.content or ""
        return "".join(
            [c.choices[0].delta.content or "" async for c in router.stream(request, context=ctx) if c.choices]
        )

    both = RequestContext(principal=AllowList("primary", "backup"))
    assert await ask(both) == "backup answer"
    assert (both.cache_status, both.model_group) == ("miss", "backup")
    primary_only = RequestContext(principal=AllowList("primary"))
    with pytest.raises(LLMRouterError):
        await ask(primary_only)
    assert primary_only.cache_status == "miss"
    again = RequestContext(principal=AllowList("primary", "backup"))
    assert await ask(again) == "backup answer"
    assert again.cache_status == "hit" and backup.record.calls == 1


async def test_a_flight_a_fallback_may_serve_is_not_joined_by_a_key_that_may_not_use_it(
    fallback_routed: Any, helpers: Any
) -> None:
    from llmrouter.errors import LLMRouterError

    router, cache, backup = fallback_routed
    backup.gate = anyio.Event()
    request = body(model="primary")
    outcome: list[object] = []

    async def ask(ctx: RequestContext) -> None:
        try:
            outcome.append(await router.chat(request, context=ctx))
        except LLMRouterError as exc:
            outcome.append(exc)

    both = RequestContext(principal=AllowList("primary", "backup"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, both)
        await helpers.wait_until(lambda: both.fallbacks == 1)  # its flight waits on backup
        tg.start_soon(ask, RequestContext(principal=AllowList("primary")))
        await helpers.wait_until(lambda: bool(outcome) or cache.stats.coalesced > 0)
        backup.gate.set()
    assert cache.stats.coalesced == 0
    assert isinstance(outcome[0], LLMRouterError)
    assert isinstance(outcome[1], ChatResponse) and outcome[1].choices[0].message.content == "backup answer"
