"""Router behaviour with in-process scripted providers."""

import math
from collections import Counter

import anyio
import pytest

from llmrouter import Router, RouterHooks
from llmrouter.config import Config, Cooldown, Deployment, ModelGroup, Price, Retry, RouterConfig, Timeouts
from llmrouter.context import RequestContext, current_context
from llmrouter.errors import (
    AuthenticationError,
    BudgetExceededError,
    ContextWindowExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    NoDeploymentAvailableError,
    PermissionDeniedError,
    RateLimitError,
    UnsupportedFeatureError,
    UpstreamAuthenticationError,
    UpstreamError,
    UpstreamTimeoutError,
)
from llmrouter.provider import Capabilities, Provider
from llmrouter.registry import register_provider
from llmrouter.testing.scripted import ScriptedProvider, Step
from llmrouter.types import PromptTokensDetails, Usage

pytestmark = pytest.mark.anyio

FAST_RETRY = Retry(attempts=2, backoff_base=0.001, backoff_max=0.01)


def chat_body(model="g", text="hi", **extra):
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def make_router(*providers, strategy="priority", hooks=(), config=None, group="g", **group_kwargs):
    config = config or Config(router=RouterConfig(retry=FAST_RETRY))
    router = Router(config, hooks=hooks)
    deployments = []
    for i, provider in enumerate(providers):
        deployment = Deployment(
            provider="scripted", model=provider.model, id=f"d{i}", **group_kwargs.pop(f"d{i}", {})
        )
        deployments.append(router.add_deployment(group, provider, deployment))
    router.groups[group].strategy = __import__("llmrouter.strategies", fromlist=["x"]).get_strategy(strategy)
    for key, value in group_kwargs.items():
        setattr(router.groups[group], key, value)
    return router


async def test_chat_returns_answer_and_fills_context():
    provider = ScriptedProvider(default=Step(text="Paris is the capital."))
    router = make_router(provider)
    ctx = RequestContext()
    response = await router.chat(chat_body(), context=ctx)
    assert response.choices[0].message.content == "Paris is the capital."
    assert ctx.status == "ok" and ctx.deployment == "d0" and ctx.model_group == "g"
    assert ctx.usage.completion_tokens == 4 and not ctx.usage.estimated
    assert ctx.ttft_ms is not None and ctx.latency_ms >= ctx.ttft_ms
    assert provider.started, "the router starts providers on first use"


async def test_unknown_model_is_404_with_param():
    router = make_router(ScriptedProvider())
    with pytest.raises(ModelNotFoundError) as info:
        await router.chat(chat_body(model="nope"))
    assert info.value.http_status == 404 and info.value.param == "model"


async def test_aliases_and_direct_provider_addressing():
    register_provider("scripted", ScriptedProvider)
    config = Config(
        models=[
            ModelGroup(name="big", aliases=["gpt"], deployments=[Deployment(provider="scripted", model="m1")])
        ]
    )
    router = Router(config)
    ctx = RequestContext()
    await router.chat(chat_body(model="gpt"), context=ctx)
    assert ctx.model_group == "big"
    ctx = RequestContext()
    await router.chat(chat_body(model="scripted/other-model"), context=ctx)
    assert ctx.upstream_model == "other-model" and ctx.provider == "scripted"
    names = [card.id for card in (await router.list_models()).data]
    assert {"big", "gpt"} <= set(names)


async def test_upstream_model_name_replaces_group_name():
    provider = ScriptedProvider(model="upstream-7b")
    router = make_router(provider)
    await router.chat(chat_body(model="g"))
    assert provider.record.requests[0].model == "upstream-7b"


async def test_priority_order_and_retry_goes_to_next_deployment():
    first = ScriptedProvider(steps=[Step(error=UpstreamError("boom"))])
    second = ScriptedProvider(default=Step(text="from second"))
    router = make_router(first, second, d1={"priority": 1})
    ctx = RequestContext()
    response = await router.chat(chat_body(), context=ctx)
    assert response.choices[0].message.content == "from second"
    assert ctx.attempts == 2 and ctx.deployment == "d1"
    assert first.record.calls == 1 and second.record.calls == 1


async def test_retryable_error_retries_same_deployment_with_backoff():
    provider = ScriptedProvider(steps=[Step(error=RateLimitError("slow", retryable=True, retry_after=0.01))])
    router = make_router(provider)
    ctx = RequestContext()
    await router.chat(chat_body(), context=ctx)
    assert provider.record.calls == 2 and ctx.attempts == 2


async def test_bad_request_is_not_retried():
    provider = ScriptedProvider(steps=[Step(error=InvalidRequestError("bad", param="messages"))])
    other = ScriptedProvider()
    router = make_router(provider, other)
    with pytest.raises(InvalidRequestError):
        await router.chat(chat_body())
    assert provider.record.calls == 1 and other.record.calls == 0


async def test_deployment_auth_error_moves_on_without_retrying_it():
    broken = ScriptedProvider(default=Step(error=AuthenticationError("bad upstream key")))
    good = ScriptedProvider()
    router = make_router(broken, good, d1={"priority": 1})
    for _ in range(2):
        await router.chat(chat_body())
    assert broken.record.calls == 2 and good.record.calls == 2


async def test_an_upstream_401_is_the_deployments_credentials_not_the_callers():
    """Told as the caller's own 401, it read as the caller's key being wrong; and an SDK
    retrying the 502 presents the same credentials again."""
    broken = ScriptedProvider(default=Step(error=AuthenticationError("bad upstream key")))
    router = make_router(broken)
    ctx = RequestContext()
    with pytest.raises(UpstreamAuthenticationError) as refused:
        await router.chat(chat_body(), context=ctx)
    error = refused.value
    assert (error.http_status, error.code, error.retryable) == (502, "upstream_authentication_failed", False)
    assert "bad upstream key" in error.message and error.headers()["x-should-retry"] == "false"
    assert ctx.error is error, "the ledger and metrics record what the caller was told"


async def test_retries_exhausted_raise_last_error():
    provider = ScriptedProvider(default=Step(error=UpstreamError("down")))
    router = make_router(provider)
    with pytest.raises(UpstreamError, match="down"):
        await router.chat(chat_body())
    assert provider.record.calls == FAST_RETRY.attempts + 1


async def test_fallback_to_other_group():
    config = Config(router=RouterConfig(retry=FAST_RETRY))
    router = Router(config)
    failing = ScriptedProvider(default=Step(error=UpstreamError("down")))
    backup = ScriptedProvider(default=Step(text="backup answer"))
    router.add_deployment("backup", backup)
    group = router.add_deployment("main", failing)
    router.groups["main"].config = ModelGroup(name="main", deployments=[], fallbacks=["backup"])
    seen = []

    class Events(RouterHooks):
        def on_fallback(self, ctx, from_group, to_group):
            seen.append((from_group, to_group))

    router.hooks.append(Events())
    ctx = RequestContext()
    response = await router.chat(chat_body(model="main"), context=ctx)
    assert response.choices[0].message.content == "backup answer"
    assert ctx.fallbacks == 1 and ctx.model_group == "backup" and seen == [("main", "backup")]
    assert group.failures == 3


async def test_cooldown_after_consecutive_failures_then_recovery():
    flaky = ScriptedProvider(steps=[Step(error=UpstreamError("x"))] * 2)
    steady = ScriptedProvider()
    router = make_router(
        flaky, steady, d1={"priority": 1}, cooldown=Cooldown(failures=2, seconds=0.2), retry=Retry(attempts=0)
    )
    cooled = []

    class Events(RouterHooks):
        def on_cooldown(self, deployment, seconds):
            cooled.append(deployment)

    router.hooks.append(Events())
    for _ in range(2):
        with pytest.raises(UpstreamError):
            await router.chat(chat_body())
    assert cooled == ["d0"]
    ctx = RequestContext()
    await router.chat(chat_body(), context=ctx)
    assert ctx.deployment == "d1", "the cooling deployment is skipped"
    await anyio.sleep(0.25)
    ctx = RequestContext()
    await router.chat(chat_body(), context=ctx)
    assert ctx.deployment == "d0", "after the cooldown it serves again"
    readiness = await router.readiness(probe=False)
    assert {d["id"] for d in readiness["deployments"]} == {"d0", "d1"}


async def test_all_cooling_is_503_with_retry_after():
    provider = ScriptedProvider(default=Step(error=UpstreamError("x")))
    router = make_router(provider, cooldown=Cooldown(failures=1, seconds=30), retry=Retry(attempts=0))
    with pytest.raises(UpstreamError):
        await router.chat(chat_body())
    with pytest.raises(NoDeploymentAvailableError) as info:
        await router.chat(chat_body())
    assert info.value.http_status == 503 and 29 < info.value.retry_after <= 30


@pytest.mark.parametrize(
    "refusal",
    [
        UnsupportedFeatureError("`n` > 1 is not supported", param="n"),
        ContextWindowExceededError("the prompt is longer than the context window", param="messages"),
        # OpenRouter's moderation: before, three flagged prompts took the model from everyone.
        PermissionDeniedError("Your input was flagged for violating our content policy"),
    ],
)
async def test_a_deployment_refusing_a_request_is_not_cooled_down(refusal):
    picky = ScriptedProvider(default=Step(error=refusal))
    router = make_router(picky, cooldown=Cooldown(failures=1, seconds=30), retry=Retry(attempts=0))
    for _ in range(3):
        with pytest.raises(type(refusal)):
            await router.chat(chat_body())
    assert picky.record.calls == 3, "every request reaches the deployment: none is refused for a cooldown"
    readiness = await router.readiness(probe=False)
    (deployment,) = readiness["deployments"]
    assert deployment["healthy"] and deployment["failures"] == 0


async def test_a_refusal_moves_on_to_a_deployment_that_takes_the_request():
    picky = ScriptedProvider(default=Step(error=UnsupportedFeatureError("no tools here", param="tools")))
    able = ScriptedProvider(default=Step(text="with tools"))
    router = make_router(picky, able, d1={"priority": 1}, retry=Retry(attempts=2))
    response = await router.chat(chat_body())
    assert response.choices[0].message.content == "with tools"
    assert picky.record.calls == 1, "a refusal is not retried on the deployment that refused"


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
# Each case: what the deployment declares it lacks, the call and request that need it,
# and the error's param when no deployment can serve it.
UNSERVABLE = {
    "stream": ({"streaming": False}, "stream", chat_body(), "stream"),
    "completions": ({"completions": False}, "complete", {"model": "g", "prompt": "Once"}, "model"),
    "tools": ({"tools": False}, "chat", chat_body(tools=TOOLS), "tools"),
    "json": (
        {"json_mode": False},
        "chat",
        chat_body(response_format={"type": "json_object"}),
        "response_format",
    ),
    "vision": (
        {"vision": False},
        "chat",
        {"model": "g", "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, IMAGE]}]},
        "messages[0].content",
    ),
    "context": ({"max_context": 50}, "chat", chat_body(text="word " * 200), "messages"),
}


async def _ask(router, call, body, context=None):
    if call == "stream":
        return [chunk async for chunk in router.stream(body, context=context)]
    return await getattr(router, call)(body, context=context)


@pytest.mark.parametrize(("lacks", "call", "body", "param"), UNSERVABLE.values(), ids=UNSERVABLE)
async def test_a_deployment_that_declares_it_cannot_serve_a_request_is_passed_over(lacks, call, body, param):
    """Capabilities were never read: the request went to the deployment anyway."""
    full = {"tools": True, "json_mode": True, "vision": True, "completions": True}
    unable = ScriptedProvider(capabilities=Capabilities(**{**full, **lacks}))
    able = ScriptedProvider(capabilities=Capabilities(**full))
    router = make_router(unable, able, cooldown=Cooldown(failures=1, seconds=30))
    ctx = RequestContext()
    await _ask(router, call, body, ctx)
    assert (ctx.deployment, ctx.attempts, unable.record.calls) == ("d1", 1, 0)
    readiness = await router.readiness(probe=False)
    assert all(d["healthy"] and d["failures"] == 0 for d in readiness["deployments"]), "no failure"

    alone = make_router(ScriptedProvider(capabilities=Capabilities(**{**full, **lacks})))
    expected = ContextWindowExceededError if "max_context" in lacks else UnsupportedFeatureError
    with pytest.raises(expected) as info:
        await _ask(alone, call, body)
    assert (info.value.param, info.value.provider) == (param, "scripted")
    assert "'d0'" in info.value.message


async def test_a_request_no_deployment_of_its_group_can_serve_falls_back():
    config = Config(
        router=RouterConfig(retry=FAST_RETRY),
        models=[ModelGroup(name="g", fallbacks=["big"], deployments=[])],
    )
    router = make_router(ScriptedProvider(capabilities=Capabilities(max_context=50)), config=config)
    big = ScriptedProvider(default=Step(text="from the big one"))
    router.add_deployment("big", big, Deployment(provider="scripted", model="big", id="big"))
    ctx = RequestContext()
    response = await router.chat(chat_body(text="word " * 200), context=ctx)
    assert response.choices[0].message.content == "from the big one"
    assert (ctx.deployment, ctx.fallbacks) == ("big", 1)


async def test_the_prompt_is_counted_for_a_context_window_only_when_one_is_declared():
    router = make_router(ScriptedProvider(capabilities=Capabilities(tools=True)))
    ctx = RequestContext()
    await router.chat(chat_body(text="a short prompt"), context=ctx)
    assert router.groups["g"].deployments[0].limits is not None  # it declares no vision
    assert ctx.prompt_tokens_estimate == 0, "unpriced, no max_context: nothing to count it for"
    served = make_router(ScriptedProvider(capabilities=Capabilities(max_context=50)))
    ctx = RequestContext()
    await served.chat(chat_body(text="a short prompt"), context=ctx)
    assert ctx.prompt_tokens_estimate > 0 and ctx.deployment == "d0"


async def test_a_deployment_that_declares_it_serves_everything_is_not_checked():
    everything = Capabilities(tools=True, json_mode=True, vision=True, completions=True)
    router = make_router(ScriptedProvider(capabilities=everything))
    await router.chat(chat_body())
    assert router.groups["g"].deployments[0].limits is None


async def test_max_concurrency_is_respected():
    provider = ScriptedProvider(default=Step(delay=0.05))
    router = make_router(provider, d0={"max_concurrency": 2})
    peak = 0
    deployment = router.groups["g"].deployments[0]

    async def watch():
        nonlocal peak
        for _ in range(40):
            peak = max(peak, deployment.in_flight)
            await anyio.sleep(0.005)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        for _ in range(6):
            tg.start_soon(router.chat, chat_body())
    assert peak == 2 and provider.record.completed == 6


async def test_least_busy_spreads_concurrent_load():
    providers = [ScriptedProvider(default=Step(delay=0.05)) for _ in range(3)]
    router = make_router(*providers, strategy="least_busy")
    async with anyio.create_task_group() as tg:
        for _ in range(9):
            tg.start_soon(router.chat, chat_body())
    assert [p.record.calls for p in providers] == [3, 3, 3]


async def test_weighted_follows_weights():
    heavy, light = ScriptedProvider(), ScriptedProvider()
    router = make_router(heavy, light, strategy="weighted", d0={"weight": 9}, d1={"weight": 1})
    for _ in range(400):
        await router.chat(chat_body())
    assert 0.8 < heavy.record.calls / 400 < 0.97


async def test_lowest_latency_prefers_the_faster_deployment():
    slow, fast = ScriptedProvider(default=Step(delay=0.03)), ScriptedProvider(default=Step(delay=0.0))
    router = make_router(slow, fast, strategy="lowest_latency")
    for _ in range(12):
        await router.chat(chat_body())
    assert slow.record.calls == 1 and fast.record.calls == 11


async def test_cheapest_picks_lowest_price():
    pricey, cheap = ScriptedProvider(), ScriptedProvider()
    router = make_router(pricey, cheap, strategy="cheapest")
    router.groups["g"].deployments[0].price = Price(input=5, output=15)
    router.groups["g"].deployments[1].price = Price(input=0.1, output=0.4)
    await router.chat(chat_body())
    assert cheap.record.calls == 1 and pricey.record.calls == 0


async def test_total_timeout_is_retryable_timeout():
    slow = ScriptedProvider(default=Step(delay=5))
    router = make_router(slow, timeouts=Timeouts(total=0.05), retry=Retry(attempts=0))
    with anyio.fail_after(2):
        with pytest.raises(UpstreamTimeoutError):
            await router.chat(chat_body())
    assert slow.record.cancelled == 1


async def test_stream_first_token_timeout_fails_over():
    slow = ScriptedProvider(default=Step(delay=5))
    fast = ScriptedProvider(default=Step(text="a b c"))
    router = make_router(slow, fast, d1={"priority": 1}, timeouts=Timeouts(first_token=0.05, total=10))
    with anyio.fail_after(2):
        chunks = [c async for c in router.stream(chat_body())]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a b c"
    assert slow.record.cancelled == 1


async def test_cancelling_the_caller_cancels_the_provider():
    provider = ScriptedProvider(default=Step(delay=10))
    router = make_router(provider)
    ctx = RequestContext()
    with anyio.move_on_after(0.05):
        await router.chat(chat_body(), context=ctx)
    assert provider.record.cancelled == 1
    assert ctx.status == "cancelled"
    assert router.groups["g"].deployments[0].in_flight == 0


@pytest.mark.parametrize("price", [Price(input=2.0, output=8.0), None], ids=["priced", "unpriced"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_cancelled_before_its_answer_is_billed_its_prompt(stream, price):
    """The upstream has read the prompt: a client leaving before the answer (or before a
    stream's first chunk) used to be billed nothing, and named no deployment. An unpriced
    one counts its prompt too (a JSON call's was 0: only priced requests had it counted)."""
    provider = ScriptedProvider(default=Step(delay=10))
    router = make_router(provider, d0={"price": price})
    ctx = RequestContext()

    async def call() -> None:
        if stream:
            async for _ in router.stream(chat_body(text="a prompt of some words"), context=ctx):
                pass
        else:
            await router.chat(chat_body(text="a prompt of some words"), context=ctx)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            while not provider.record.calls:  # noqa: ASYNC110 - the fake counts, it has no event
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()  # the client leaves while the upstream works
    assert provider.record.cancelled == 1
    assert (ctx.status, ctx.deployment) == ("cancelled", "d0")
    assert ctx.usage.estimated and ctx.usage.prompt_tokens > 0 and ctx.usage.completion_tokens == 0
    if price is None:
        assert (ctx.cost, ctx.cost_source) == (0.0, "unpriced")
    else:
        assert ctx.cost == pytest.approx(ctx.usage.prompt_tokens * 2.0 / 1e6)
        assert ctx.cost_source == "price_table"


async def test_a_stream_cancelled_mid_answer_is_billed_what_it_sent():
    """Cancelled by the caller's scope (not closed): the count of the partial output ran,
    then the cancellation went on and took the count with it."""
    provider = ScriptedProvider(
        default=Step(text="one two three four five six", chunk_delay=0.05, usage=False)
    )
    router = make_router(provider, d0={"price": Price(input=2.0, output=8.0)})
    ctx = RequestContext()
    received = []
    with anyio.fail_after(5):
        with anyio.CancelScope() as scope:
            async for chunk in router.stream(chat_body(), context=ctx):
                received.append(chunk)
                if len(received) == 2:
                    scope.cancel()
    assert ctx.status == "cancelled"
    assert ctx.usage.estimated and ctx.usage.completion_tokens >= 1
    assert ctx.cost > 0


async def test_closing_a_stream_closes_the_provider_stream_and_bills_partial_output():
    provider = ScriptedProvider(
        default=Step(text="one two three four five six", chunk_delay=0.01, usage=False)
    )
    router = make_router(provider)
    ctx = RequestContext()
    stream = router.stream(chat_body(), context=ctx)
    received = [await stream.__anext__(), await stream.__anext__()]
    await stream.aclose()
    assert len(received) == 2
    assert provider.record.cancelled == 1 and provider.record.completed == 0
    assert ctx.status == "cancelled"
    assert ctx.usage.estimated and ctx.usage.completion_tokens >= 2


async def test_stream_usage_chunk_only_when_asked():
    router = make_router(ScriptedProvider(default=Step(text="a b")))
    plain = [c async for c in router.stream(chat_body())]
    assert all(c.usage is None for c in plain)
    ctx = RequestContext()
    asked = [c async for c in router.stream(chat_body(stream_options={"include_usage": True}), context=ctx)]
    assert asked[-1].usage is not None and asked[-1].choices == []
    assert ctx.usage == asked[-1].usage


async def test_each_delivered_chunk_reaches_on_chunk_hooks_and_the_chunk_times():
    seen: list[str] = []

    class Chunks(RouterHooks):
        def on_chunk(self, ctx: RequestContext) -> None:
            seen.append(ctx.request_id)

    router = make_router(ScriptedProvider(default=Step(text="a b c")), hooks=[RouterHooks(), Chunks()])
    ctx = RequestContext(chunk_times=[])
    chunks = [c async for c in router.stream(chat_body(), context=ctx)]
    assert len(seen) == len(chunks) == len(ctx.chunk_times) > 1
    assert list(ctx.chunk_times) == sorted(ctx.chunk_times)  # perf_counter() as each went out
    untimed = RequestContext()
    [c async for c in router.stream(chat_body(), context=untimed)]
    assert untimed.chunk_times is None  # nothing asked for them: nothing noted


async def test_mid_stream_failure_raises_after_content():
    provider = ScriptedProvider(
        default=Step(text="a b c d", fail_after_chunks=2, error=UpstreamError("reset"))
    )
    router = make_router(provider)
    ctx = RequestContext()
    got = []
    with pytest.raises(UpstreamError, match="reset"):
        async for chunk in router.stream(chat_body(), context=ctx):
            got.append(chunk)
    assert len(got) == 2 and provider.record.calls == 1, "no retry once content was sent"
    assert ctx.status == "error" and ctx.usage.estimated


class Recorder(RouterHooks):
    def __init__(self, name, log, reject=None):
        self.name, self.log, self.reject = name, log, reject

    async def before_request(self, ctx):
        self.log.append(("before", self.name))
        assert ctx.max_cost is not None
        if self.reject:
            raise self.reject

    async def after_request(self, ctx):
        self.log.append(("after", self.name, ctx.status, ctx.cost))

    def on_rejected(self, ctx, error):
        self.log.append(("rejected", self.name, type(error).__name__))


async def test_hooks_order_and_exactly_once_after():
    log = []
    router = make_router(ScriptedProvider(), hooks=[Recorder("a", log), Recorder("b", log)])
    await router.chat(chat_body())
    assert log == [("before", "a"), ("before", "b"), ("after", "b", "ok", 0.0), ("after", "a", "ok", 0.0)]


async def test_rejection_releases_admitted_hooks_and_reports():
    log = []
    provider = ScriptedProvider()
    router = make_router(
        provider, hooks=[Recorder("a", log), Recorder("b", log, reject=BudgetExceededError("no money"))]
    )
    with pytest.raises(BudgetExceededError):
        await router.chat(chat_body())
    assert provider.record.calls == 0
    assert ("after", "a", "error", None) in log and not any(e[:2] == ("after", "b") for e in log)
    assert ("rejected", "a", "BudgetExceededError") in log and ("rejected", "b", "BudgetExceededError") in log


async def test_cost_from_price_table_and_max_cost_bound():
    provider = ScriptedProvider(
        default=Step(usage=Usage(prompt_tokens=1000, completion_tokens=500, total_tokens=1500))
    )
    router = make_router(provider)
    router.groups["g"].deployments[0].price = Price(input=2.0, output=8.0)
    ctx = RequestContext()
    await router.chat(chat_body(max_tokens=100), context=ctx)
    assert ctx.cost == pytest.approx((1000 * 2 + 500 * 8) / 1e6) and ctx.cost_source == "price_table"
    assert ctx.max_cost == pytest.approx((ctx.prompt_tokens_estimate * 2 + 100 * 8) / 1e6)
    ctx = RequestContext()
    await router.chat(chat_body(), context=ctx)
    bounded = provider.record.requests[-1]
    # As max_completion_tokens: OpenAI's reasoning models refuse max_tokens.
    assert (bounded.max_completion_tokens, bounded.max_tokens) == (4096, None), (
        "priced requests get a bounded output"
    )
    await router.complete({"model": "g", "prompt": "Once", "max_tokens": None})
    assert provider.record.requests[-1].max_tokens == 4096, "a completion's limit is max_tokens"


async def test_the_cost_bound_covers_every_choice_and_the_tool_definitions():
    provider = ScriptedProvider()
    router = make_router(provider)
    router.groups["g"].deployments[0].price = Price(input=2.0, output=8.0)
    plain = RequestContext()
    await router.chat(chat_body(max_tokens=100), context=plain)
    four = RequestContext()
    await router.chat(chat_body(max_tokens=100, n=4), context=four)
    assert four.max_cost == pytest.approx(plain.max_cost + 3 * 100 * 8 / 1e6)  # n answers of 100
    tool = {
        "type": "function",
        "function": {"name": "lookup", "description": "word " * 200, "parameters": {"type": "object"}},
    }
    tooled = RequestContext()
    await router.chat(chat_body(max_tokens=100, tools=[tool]), context=tooled)
    assert tooled.prompt_tokens_estimate > plain.prompt_tokens_estimate + 200  # tools are billed as prompt


async def test_an_estimated_answer_is_not_counted_past_the_output_limit():
    # tiktoken's count of an answer the upstream cut at max_tokens can exceed it; the
    # budget reservation covered max_tokens, so the estimate must not bill more.
    router = make_router(ScriptedProvider(default=Step(text="word " * 60, usage=False)))
    router.groups["g"].deployments[0].price = Price(input=2.0, output=8.0)
    ctx = RequestContext()
    await router.chat(chat_body(max_tokens=50), context=ctx)
    assert ctx.usage.estimated and ctx.usage.completion_tokens == 50
    assert ctx.cost <= ctx.max_cost
    ctx = RequestContext()
    await router.chat(chat_body(max_tokens=100), context=ctx)
    assert 50 < ctx.usage.completion_tokens <= 100  # under the limit: counted as it is
    # The same for usage a provider estimated (the remote provider, when the upstream
    # reports none); reported usage is billed as reported.
    for estimated, billed in [(True, 50), (False, 65)]:
        usage = Usage(prompt_tokens=7, completion_tokens=65, total_tokens=72, estimated=estimated)
        router = make_router(ScriptedProvider(default=Step(usage=usage)))
        router.groups["g"].deployments[0].price = Price(input=2.0, output=8.0)
        ctx = RequestContext()
        await router.chat(chat_body(max_tokens=50), context=ctx)
        assert ctx.usage.completion_tokens == billed and ctx.usage.total_tokens == 7 + billed


async def test_provider_reported_cost_wins():
    usage = Usage(prompt_tokens=10, completion_tokens=10, total_tokens=20, cost=0.0123)
    router = make_router(ScriptedProvider(default=Step(usage=usage)))
    router.groups["g"].deployments[0].price = Price(input=1, output=1)
    ctx = RequestContext()
    await router.chat(chat_body(), context=ctx)
    assert ctx.cost == 0.0123 and ctx.cost_source == "provider"


@pytest.mark.parametrize("reported", [-0.5, math.inf, math.nan])
async def test_a_reported_cost_that_is_no_cost_is_priced_from_the_table(reported: float):
    usage = Usage(prompt_tokens=10, completion_tokens=10, total_tokens=20, cost=reported)
    router = make_router(ScriptedProvider(default=Step(usage=usage)))
    router.groups["g"].deployments[0].price = Price(input=1, output=3)
    ctx = RequestContext()
    await router.chat(chat_body(), context=ctx)
    assert ctx.cost == pytest.approx(40 / 1e6) and ctx.cost_source == "price_table"


@pytest.mark.parametrize(
    ("prompt", "completion", "cached", "billed"),
    [
        (-5, 10, 0, (0, 10, 0)),  # a negative count would lower the cost
        (10, 10**30, 0, (10, 2**31 - 1, 0)),  # as many as the ledger's column holds
        (10, 10, -3, (10, 10, 0)),
        (10, 10, 50, (10, 10, 10)),  # no more cached than prompt tokens
        (10, 10, 4, (10, 10, 4)),
    ],
)
async def test_reported_counts_out_of_range_are_billed_within_it(
    prompt: int, completion: int, cached: int, billed: tuple[int, int, int]
):
    details = PromptTokensDetails(cached_tokens=cached)
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=details,
    )
    router = make_router(ScriptedProvider(default=Step(usage=usage)))
    price = Price(input=1, output=3, cached_input=0.5)
    router.groups["g"].deployments[0].price = price
    ctx = RequestContext()
    await router.chat(chat_body(), context=ctx)
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens, ctx.usage.cached_tokens) == billed
    assert ctx.usage.total_tokens == billed[0] + billed[1]
    assert ctx.cost == pytest.approx(((billed[0] - billed[2]) * 1 + billed[2] * 0.5 + billed[1] * 3) / 1e6)
    assert ctx.cost >= 0


async def test_missing_usage_is_counted_and_marked_estimated():
    router = make_router(ScriptedProvider(default=Step(text="hello there world", usage=False)))
    ctx = RequestContext()
    await router.chat(chat_body(), context=ctx)
    assert ctx.usage.estimated and ctx.usage.completion_tokens == 3 and ctx.usage.prompt_tokens > 0


async def test_current_context_is_visible_to_the_provider():
    seen = []

    class Peeking(ScriptedProvider):
        async def chat(self, request):
            seen.append(current_context.get())
            return await super().chat(request)

    router = make_router(Peeking())
    ctx = RequestContext(traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    await router.chat(chat_body(), context=ctx)
    assert seen == [ctx] and current_context.get() is None


async def test_completions_and_streamed_completions():
    router = make_router(ScriptedProvider(default=Step(echo=True)))
    response = await router.complete({"model": "g", "prompt": "say this back"})
    assert response.choices[0].text == "say this back"
    chunks = [c async for c in router.stream_complete({"model": "g", "prompt": "x y", "stream": True})]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "x y"


async def test_a_completion_of_several_prompts_is_priced_for_all_of_them():
    # Before: a 400 "only a single text prompt" at admission, for any priced group.
    provider = ScriptedProvider(default=Step(text="ok", usage=False))
    router = make_router(provider, d0={"price": Price(input=2.0, output=8.0)})
    for prompt, prompts in ((["a b c", "d e f"], 2), ([[1, 2, 3, 4], [5, 6]], 2), ([1, 2, 3, 4], 1)):
        ctx = RequestContext()
        await router.complete({"model": "g", "prompt": prompt, "max_tokens": 10}, context=ctx)
        assert ctx.prompt_tokens_estimate > 0
        bound = (ctx.prompt_tokens_estimate * 2.0 + 10 * prompts * 8.0) / 1e6
        assert ctx.max_cost == pytest.approx(bound)  # each prompt may use the whole limit
        assert ctx.usage.estimated and ctx.usage.prompt_tokens == ctx.prompt_tokens_estimate
    assert provider.record.calls == 3


async def test_a_deployment_that_takes_one_text_prompt_only_passes_a_list_on():
    class OneTextPrompt(ScriptedProvider):
        async def complete(self, request):
            request.prompt_text  # noqa: B018 - raises for the forms this deployment cannot take
            return await super().complete(request)

    single, any_prompt = OneTextPrompt(), ScriptedProvider(default=Step(text="both"))
    router = make_router(single, any_prompt, d1={"priority": 1})
    response = await router.complete({"model": "g", "prompt": ["one", "two"]})
    assert response.choices[0].text == "both"  # before: a 400, the second never asked
    readiness = await router.readiness(probe=False)
    assert [d["failures"] for d in readiness["deployments"]] == [0, 0]


async def test_failed_start_takes_deployment_out_and_others_serve():
    class Broken(ScriptedProvider):
        async def start(self):
            raise RuntimeError("weights missing")

    good = ScriptedProvider()
    router = make_router(Broken(), good)
    ctx = RequestContext()
    await router.chat(chat_body(), context=ctx)
    assert ctx.deployment == "d1"
    states = {d["id"]: d for d in (await router.readiness())["deployments"]}
    assert states["d0"]["healthy"] is False and "weights missing" in states["d0"]["error"]


async def test_calls_are_counted_per_deployment():
    providers = [ScriptedProvider() for _ in range(2)]
    router = make_router(*providers, strategy="weighted")
    for _ in range(50):
        await router.chat(chat_body())
    counts = Counter(d.requests for d in router.deployments)
    assert sum(d.requests for d in router.deployments) == 50 and len(counts) >= 1


async def test_stream_total_timeout_ends_a_stream_that_keeps_producing():
    slow = ScriptedProvider(default=Step(text=" ".join(["w"] * 50), chunk_delay=0.02))
    router = make_router(slow, timeouts=Timeouts(first_token=1, total=0.2), retry=Retry(attempts=0))
    got = []
    with anyio.fail_after(3):
        with pytest.raises(UpstreamTimeoutError, match="total timeout"):
            async for chunk in router.stream(chat_body()):
                got.append(chunk)
    assert 3 <= len(got) < 50


def test_timeouts_connect_reaches_http_providers_unless_set():
    from llmrouter.config import parse_config

    config = parse_config(
        {
            "router": {"timeouts": {"connect": 2.5}},
            "models": [
                {
                    "name": "a",
                    "deployments": [{"provider": "remote", "model": "m", "base_url": "http://x/v1"}],
                },
                {
                    "name": "b",
                    "timeouts": {"connect": 4},
                    "deployments": [{"provider": "remote", "model": "m", "base_url": "http://x/v1"}],
                },
                {
                    "name": "c",
                    "deployments": [
                        {"provider": "remote", "model": "m", "base_url": "http://x/v1", "connect_timeout": 7}
                    ],
                },
            ],
        },
        env={},
    )
    router = Router(config)
    timeouts = {
        name: group.deployments[0].provider.options.connect_timeout for name, group in router.groups.items()
    }
    assert timeouts == {"a": 2.5, "b": 4, "c": 7}


async def test_direct_addressing_only_for_providers_that_allow_it():
    class LoadsWeights(ScriptedProvider):
        direct = False

    register_provider("weights", LoadsWeights)
    router = Router(Config())
    for name in ("weights/some-model", "remote/anything", "nosuch/model"):
        with pytest.raises(ModelNotFoundError) as info:
            await router.chat(chat_body(model=name))
        assert info.value.message == f"The model `{name}` does not exist or you do not have access to it."
    assert "weights/some-model" not in router.groups


async def test_direct_names_are_bounded_in_number_and_length():
    from llmrouter.config import RouterConfig

    register_provider("scripted", ScriptedProvider)
    router = Router(Config(router=RouterConfig(max_direct_models=2)))
    for name in ("scripted/a", "scripted/b", "scripted/a"):
        await router.chat(chat_body(model=name))
    for name in ("scripted/c", "scripted/" + "x" * 300):
        with pytest.raises(ModelNotFoundError):
            await router.chat(chat_body(model=name))
    assert sorted(router.groups) == ["scripted/a", "scripted/b"]
    assert sorted(m.id for m in (await router.list_models()).data) == ["scripted/a", "scripted/b"]


async def test_a_deployment_that_failed_to_start_is_not_started_again_by_each_new_direct_name():
    # Each new direct name restarts the router; before, that re-ran the failed start,
    # behind the start lock every request waits on (a model load: minutes).
    class BrokenStart(ScriptedProvider):
        tries = 0

        async def start(self) -> None:
            BrokenStart.tries += 1
            raise RuntimeError("engine failed to load")

    register_provider("scripted", ScriptedProvider)
    register_provider("broken", BrokenStart)
    router = Router(
        Config(
            models=[
                ModelGroup(name="g", deployments=[Deployment(provider="scripted", model="m")]),
                ModelGroup(name="bad", deployments=[Deployment(provider="broken", model="m")]),
            ]
        )
    )
    await router.start()
    for name in ("scripted/x", "scripted/y", "g"):
        await router.chat(chat_body(model=name))
    assert BrokenStart.tries == 1
    assert [d.start_error for d in router.groups["bad"].deployments] == [
        "RuntimeError: engine failed to load"
    ]


async def test_a_group_that_cannot_be_built_is_not_registered():
    from llmrouter.config import ModelGroup
    from llmrouter.errors import ConfigError

    router = Router(Config())
    with pytest.raises(ConfigError):
        router.add_group(ModelGroup(name="broken", deployments=[Deployment(provider="remote", model="m")]))
    assert "broken" not in router.groups
    assert [m.id for m in (await router.list_models()).data] == []


async def test_long_texts_are_counted_off_the_event_loop():
    import threading

    from llmrouter.counting import count_in_worker as _count

    threads = []

    def count(text, model):
        threads.append(threading.get_ident())
        return len(text)

    assert await _count(count, "short", "gpt-4o") == 5
    assert await _count(count, "x" * 100_000, "gpt-4o") == 100_000
    assert threads[0] == threading.get_ident() and threads[1] != threading.get_ident()


async def test_a_context_window_the_provider_checks_itself_is_not_estimated():
    # tiktoken's estimate of a prompt is not the model's count: a provider that counts it
    # exactly (transformers, vLLM) would have its prompts that fit refused on the estimate.
    checked = ScriptedProvider(capabilities=Capabilities(max_context=50, context_checked=True))
    router = make_router(checked)
    ctx = RequestContext()
    await router.chat(chat_body(text="word " * 200), context=ctx)
    assert (ctx.deployment, checked.record.calls, ctx.prompt_tokens_estimate) == ("d0", 1, 0)


class _Undeclared(ScriptedProvider):
    """A plugin that leaves ``capabilities`` to the base class."""

    capabilities = Provider.capabilities


@pytest.mark.parametrize(
    "body",
    [
        chat_body(tools=TOOLS),
        chat_body(response_format={"type": "json_object"}),
        {"model": "g", "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, IMAGE]}]},
    ],
    ids=["tools", "json", "image"],
)
async def test_a_provider_that_declares_nothing_is_sent_what_it_was_before(body):
    # The base class declared tools, JSON output and images unsupported: once the router
    # read capabilities, every plugin that did not override them had those refused.
    provider = _Undeclared()
    await make_router(provider).chat(body)
    assert provider.record.calls == 1
