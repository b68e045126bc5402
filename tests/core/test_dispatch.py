"""Dispatch: failover on an upstream's odd 4xx, per-deployment back-off, waits for a slot
that a cooldown's end cuts short, latency learnt from timeouts, event hooks that raise."""

import logging
import time

import anyio
import pytest

from llmrouter import Router, RouterHooks
from llmrouter.config import Config, Cooldown, Deployment, ModelGroup, Retry, RouterConfig, Timeouts
from llmrouter.context import RequestContext
from llmrouter.errors import AuthenticationError, RateLimitError, UpstreamError, error_for_status
from llmrouter.strategies import get_strategy
from llmrouter.testing.scripted import ScriptedProvider, Step

pytestmark = pytest.mark.anyio

FAST_RETRY = Retry(attempts=2, backoff_base=0.001, backoff_max=0.01)


def chat_body(model="g"):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def make_router(*providers, strategy="priority", hooks=(), **group_attrs):
    router = Router(Config(router=RouterConfig(retry=FAST_RETRY)), hooks=hooks)
    for i, provider in enumerate(providers):
        deployment = Deployment(provider="scripted", model=provider.model, id=f"d{i}", priority=i)
        router.add_deployment("g", provider, deployment)
    router.groups["g"].strategy = get_strategy(strategy)
    for key, value in group_attrs.items():
        setattr(router.groups["g"], key, value)
    return router


class Timed(ScriptedProvider):
    """Notes when each call starts."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.starts: list[float] = []

    async def chat(self, request):
        self.starts.append(time.monotonic())
        return await super().chat(request)


@pytest.mark.parametrize("status", [405, 409, 410, 418, 451])
async def test_an_upstream_4xx_that_is_not_the_requests_fault_fails_over_and_counts(status):
    odd = ScriptedProvider(default=Step(error=error_for_status(status, "no such route")))
    good = ScriptedProvider(default=Step(text="from d1"))
    router = make_router(odd, good, cooldown=Cooldown(failures=2, seconds=30))
    for _ in range(3):
        ctx = RequestContext()
        response = await router.chat(chat_body(), context=ctx)
        assert response.choices[0].message.content == "from d1" and ctx.deployment == "d1"
    assert odd.record.calls == 2, "tried once per request, then cooled down after two failures"


@pytest.mark.parametrize("between", [UpstreamError("boom"), AuthenticationError("bad key")])
async def test_a_retry_after_holds_while_another_deployment_fails_in_between(between):
    # One wait for the whole plan: the other deployment's failure replaced it (retryable:
    # with its own short back-off) or dropped it (not retryable), and d0 was asked again
    # at once.
    limited = Timed(steps=[Step(error=RateLimitError("slow down", retryable=True, retry_after=0.2))])
    other = ScriptedProvider(steps=[Step(error=between)])
    router = make_router(limited, other, retry=Retry(attempts=2, backoff_base=0.001, backoff_max=1.0))
    with anyio.fail_after(2):
        await router.chat(chat_body())
    assert other.record.calls == 1 and len(limited.starts) == 2
    assert limited.starts[1] - limited.starts[0] >= 0.2


async def test_the_back_off_grows_with_each_deployments_own_tries(monkeypatch):
    ceilings = []

    def no_jitter(low, high):
        ceilings.append(high)
        return 0.0

    monkeypatch.setattr("llmrouter.dispatch.random.uniform", no_jitter)
    flaky = ScriptedProvider(steps=[Step(error=UpstreamError("a"))] * 2)
    other = ScriptedProvider(steps=[Step(error=UpstreamError("b"))])
    router = make_router(flaky, other, retry=Retry(attempts=3, backoff_base=0.001, backoff_max=1.0))
    await router.chat(chat_body())
    # d0 fails, d1 fails, d0 fails again: its second try, not the plan's third.
    assert ceilings == [0.001, 0.001, 0.002]


async def test_a_request_waiting_for_a_slot_takes_a_deployment_back_from_its_cooldown():
    busy, rested = ScriptedProvider(), ScriptedProvider()
    router = make_router(busy, rested, timeouts=Timeouts(first_token=10, total=10))
    full, cooling = router.groups["g"].deployments
    full.config = Deployment(provider="scripted", model=busy.model, id="d0", max_concurrency=1)
    full.in_flight = 1
    cooling.cooldown_until = time.monotonic() + 0.1
    ctx = RequestContext()
    with anyio.fail_after(2):  # it waited for the full deployment, up to the first-token timeout
        await router.chat(chat_body(), context=ctx)
    assert ctx.deployment == "d1" and rested.record.calls == 1


async def test_lowest_latency_learns_from_a_timeout_that_a_deployment_got_slow():
    was_fast = ScriptedProvider(default=Step(delay=0.0))
    steady = ScriptedProvider(default=Step(delay=0.02))
    router = make_router(was_fast, steady, strategy="lowest_latency", timeouts=Timeouts(total=0.1))
    for _ in range(4):
        await router.chat(chat_body())
    was_fast.default = Step(delay=5)
    ctx = RequestContext()
    with anyio.fail_after(2):
        await router.chat(chat_body(), context=ctx)
    assert ctx.attempts == 2 and ctx.deployment == "d1"
    assert router.groups["g"].deployments[0].ewma_ttft >= 0.1 * 0.3, "the timeout counted, at least 0.1 s"
    ctx = RequestContext()
    await router.chat(chat_body(), context=ctx)
    assert ctx.attempts == 1 and ctx.deployment == "d1", "the slow deployment is no longer tried first"


async def test_a_streams_first_token_timeout_counts_in_the_averages():
    silent, able = ScriptedProvider(default=Step(delay=5)), ScriptedProvider()
    router = make_router(silent, able, timeouts=Timeouts(first_token=0.05, total=10))
    with anyio.fail_after(2):
        assert [chunk async for chunk in router.stream(chat_body())]
    slow = router.groups["g"].deployments[0]
    assert slow.ewma_ttft is not None and slow.ewma_ttft >= 0.05


async def test_a_streams_time_to_first_token_counts_when_the_first_chunk_comes():
    # Recorded only when the stream ended: clients that close streams early left the
    # deployment unmeasured, first in lowest_latency forever.
    provider = ScriptedProvider(default=Step(text="a b c d", delay=0.01))
    router = make_router(provider)
    stream = router.stream(chat_body())
    await stream.__anext__()
    await stream.aclose()
    (deployment,) = router.groups["g"].deployments
    assert deployment.ewma_ttft is not None and deployment.ewma_ttft >= 0.01


class Broken(RouterHooks):
    """A telemetry hook whose exporter is down: every event raises."""

    def on_attempt(self, ctx, deployment, error):
        raise RuntimeError("exporter down")

    def on_fallback(self, ctx, from_group, to_group):
        raise RuntimeError("exporter down")

    def on_cooldown(self, deployment, seconds):
        raise RuntimeError("exporter down")

    def on_first_token(self, ctx):
        raise RuntimeError("exporter down")


class Ledger(RouterHooks):
    def __init__(self):
        self.rows = []

    async def after_request(self, ctx):
        self.rows.append((ctx.status, ctx.deployment, ctx.usage is not None))


@pytest.mark.parametrize("stream", [False, True])
async def test_an_event_hook_that_raises_changes_nothing(stream, caplog):
    # It failed a request the upstream had answered, and the ledger billed it nothing.
    ledger = Ledger()
    router = Router(Config(router=RouterConfig(retry=Retry(attempts=0))), hooks=[ledger, Broken()])
    router.add_deployment("main", ScriptedProvider(default=Step(error=UpstreamError("down"))))
    router.add_deployment("backup", ScriptedProvider(default=Step(text="backup answer")))
    router.groups["main"].config = ModelGroup(name="main", deployments=[], fallbacks=["backup"])
    router.groups["main"].cooldown = Cooldown(failures=1, seconds=30)
    ctx = RequestContext()
    with caplog.at_level(logging.ERROR, logger="llmrouter.dispatch"):
        if stream:
            chunks = [chunk async for chunk in router.stream(chat_body("main"), context=ctx)]
            answer: object = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            answer = (await router.chat(chat_body("main"), context=ctx)).choices[0].message.content
    assert answer == "backup answer"
    (deployment,) = router.groups["backup"].deployments
    assert ledger.rows == [("ok", deployment.id, True)]
    failed_in = {record.getMessage().rsplit(" ", 1)[-1] for record in caplog.records}
    assert failed_in == {"on_attempt", "on_fallback", "on_cooldown", "on_first_token"}
