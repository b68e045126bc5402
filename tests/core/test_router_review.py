"""Review regressions for the request path under concurrency and cancellation: slots,
back-off, time-outs that must fire, and providers that fail before their first step."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from llmrouter import Router, RouterHooks
from llmrouter.config import Config, Cooldown, Deployment, Retry, RouterConfig, Timeouts
from llmrouter.context import RequestContext, current_context
from llmrouter.errors import NoDeploymentAvailableError, UnsupportedFeatureError, UpstreamError
from llmrouter.provider import Provider
from llmrouter.testing.scripted import ScriptedProvider, Step
from llmrouter.types import ChatRequest, ChatResponse, CompletionChunk, CompletionRequest

pytestmark = pytest.mark.anyio


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "g", "messages": [{"role": "user", "content": "hi"}], **extra}


def completion_body() -> dict[str, Any]:
    return {"model": "g", "prompt": "Once upon a time"}


def router_with(*providers: ScriptedProvider, **deployment_fields: Any) -> Router:
    router = Router(Config(router=RouterConfig(retry=Retry(attempts=1, backoff_base=0.001, backoff_max=1.0))))
    for i, provider in enumerate(providers):
        fields = deployment_fields if i == 0 else {}
        router.add_deployment(
            "g",
            provider,
            Deployment(provider="scripted", model=provider.model, id=f"d{i}", priority=i, **fields),
        )
    return router


class NoCompletions(ScriptedProvider):
    """A provider left with the base class's ``stream_complete``, which raises on call
    (it is a plain method, not an async generator)."""

    def stream_complete(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        return Provider.stream_complete(self, request)


class Concurrency(ScriptedProvider):
    """Counts chat calls running at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.running = 0
        self.most = 0

    async def chat(self, request: ChatRequest) -> ChatResponse:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            return await super().chat(request)
        finally:
            self.running -= 1


async def test_stream_that_fails_on_call_falls_back_and_frees_its_slot() -> None:
    broken, working = NoCompletions("m0"), ScriptedProvider("m1", default=Step(text="the end"))
    router = router_with(broken, working)
    ctx = RequestContext()
    with anyio.fail_after(5):
        chunks = [chunk async for chunk in router.stream_complete(completion_body(), context=ctx)]
    assert "".join(c.text for chunk in chunks for c in chunk.choices) == "the end"
    assert ctx.deployment == "d1" and ctx.status == "ok"
    assert [d.in_flight for d in router.deployments] == [0, 0]
    assert current_context.get() is None


async def test_stream_that_fails_on_call_alone_is_an_error_without_a_leak() -> None:
    router = router_with(NoCompletions("m0"))
    ctx = RequestContext()
    with anyio.fail_after(5), pytest.raises(UnsupportedFeatureError):
        async for _chunk in router.stream_complete(completion_body(), context=ctx):
            pass
    assert ctx.status == "error"
    assert router.deployments[0].in_flight == 0
    assert current_context.get() is None


async def test_a_retry_after_backoff_waits_for_a_free_slot() -> None:
    # A fails with Retry-After 0.2 s; B takes the free slot during A's back-off; A's retry
    # must wait for B instead of going over max_concurrency.
    provider = Concurrency(
        "m0",
        steps=[
            Step(error=UpstreamError("busy", retry_after=0.2)),
            Step(delay=0.4, text="B"),
        ],
        default=Step(text="A"),
    )
    router = router_with(provider, max_concurrency=1)
    answers: dict[str, str] = {}

    async def ask(name: str) -> None:
        reply = await router.chat(chat_body())
        answers[name] = str(reply.choices[0].message.content)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "A")
            await anyio.sleep(0.05)
            tg.start_soon(ask, "B")
    assert answers == {"A": "A", "B": "B"}
    assert provider.most == 1, "two calls ran at once on a deployment with max_concurrency=1"
    assert router.deployments[0].in_flight == 0


async def test_waiting_for_a_slot_is_bounded_by_total_without_first_token() -> None:
    provider = ScriptedProvider("m0", default=Step(text="one two three"))
    router = router_with(provider, max_concurrency=1)
    router.groups["g"].timeouts = Timeouts(first_token=None, total=0.3)
    holder = router.stream(chat_body())
    await holder.__anext__()  # the slot stays taken while this stream is open
    try:
        with anyio.fail_after(5), pytest.raises(NoDeploymentAvailableError):
            await router.chat(chat_body())
    finally:
        await holder.aclose()
    assert router.deployments[0].in_flight == 0


async def test_a_mid_stream_failure_that_starts_a_cooldown_is_reported() -> None:
    class Cooldowns(RouterHooks):
        def __init__(self) -> None:
            self.seen: list[str] = []

        def on_cooldown(self, deployment: str, seconds: float) -> None:
            self.seen.append(deployment)

    hooks = Cooldowns()
    provider = ScriptedProvider(
        "m0", default=Step(text="a b c", fail_after_chunks=1, error=UpstreamError("reset"))
    )
    router = router_with(provider)
    router.hooks.append(hooks)
    router.groups["g"].cooldown = Cooldown(failures=1, seconds=30)
    with anyio.fail_after(5), pytest.raises(UpstreamError):
        async for _chunk in router.stream(chat_body()):
            pass
    assert router.deployments[0].cooling(time.monotonic())
    assert hooks.seen == ["d0"]
