"""Streams through a Router: the first chunk waits for the engine, and a stream closed
early still reports its exact usage."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from llmrouter_transformers import TransformersOptions, TransformersProvider

from llmrouter import Router
from llmrouter.config import Config, Deployment, RouterConfig, Timeouts
from llmrouter.context import RequestContext
from llmrouter.testing.conformance import collect_stream
from llmrouter.testing.scripted import ScriptedProvider, Step
from llmrouter.types import decode_chat_request

pytestmark = pytest.mark.anyio


def chat_body(max_tokens: int, **fields: Any) -> dict[str, Any]:
    body = {
        "model": "g",
        "messages": [{"role": "user", "content": "Write a story"}],
        "max_tokens": max_tokens,
    }
    return {**body, "temperature": 0, **fields}


@pytest.fixture
async def provider(tiny_llama: Path) -> AsyncIterator[TransformersProvider]:
    options = TransformersOptions(path=str(tiny_llama), device="cpu", torch_threads=1)
    async with TransformersProvider("tiny", options) as provider:
        yield provider


def routed(*providers: Any, timeouts: Timeouts | None = None) -> Router:
    """A router whose group ``g`` tries ``providers`` in order."""
    router = Router(Config(router=RouterConfig(timeouts=timeouts or Timeouts())))
    for index, provider in enumerate(providers):
        deployment = Deployment(provider=provider.name, model=provider.model, id=f"d{index}", priority=index)
        router.add_deployment("g", provider, deployment)
    return router


@pytest.fixture
def held_engine(provider: TransformersProvider, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The engine's forward passes wait until the returned event is set (a long prefill)."""
    release = threading.Event()
    forward = provider.engine.model.forward

    def held_forward(**inputs: Any) -> Any:
        release.wait(30)
        return forward(**inputs)

    monkeypatch.setattr(provider.engine.model, "forward", held_forward)
    yield release
    release.set()


async def test_the_first_token_timeout_covers_the_prefill(
    provider: TransformersProvider, held_engine: threading.Event
) -> None:
    """Before: a role-only chunk left before the engine ran, so the router took it for the
    first token and waited on a deployment that had produced nothing."""
    fallback = ScriptedProvider(default=Step(usage=False))
    router = routed(provider, fallback, timeouts=Timeouts(first_token=0.2, total=30))
    ctx = RequestContext()
    with anyio.fail_after(10):
        chunks = await collect_stream(router.stream(chat_body(4, stream=True), context=ctx))
    assert ctx.deployment == "d1" and fallback.record.calls == 1
    assert ctx.ttft_ms is not None and ctx.ttft_ms >= 200
    assert "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
    # The abandoned attempt sent nothing, so it reports no usage: the fallback's is counted.
    assert ctx.usage is not None and ctx.usage.estimated


async def test_the_role_rides_on_the_first_text_or_finish(provider: TransformersProvider) -> None:
    request = decode_chat_request(chat_body(3))
    first = (await collect_stream(provider.stream(request)))[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content
    eos = provider.tokenizer.eos_token_id
    at_once = await collect_stream(
        provider.stream(decode_chat_request(chat_body(3, logit_bias={str(eos): 100})))
    )
    finish = at_once[0].choices[0]
    assert (finish.delta.role, finish.delta.content, finish.finish_reason) == ("assistant", "", "stop")
    assert at_once[-1].usage is not None and at_once[-1].usage.completion_tokens == 1


async def _cancelled_job(provider: TransformersProvider) -> Any:
    """The job the engine dropped as cancelled (waits for the engine to get there)."""
    with anyio.fail_after(10):
        while True:
            jobs = [job for job in provider.engine.finished if job.finish_reason == "cancelled"]
            if jobs:
                return jobs[-1]
            await anyio.sleep(0.005)


async def test_a_stream_closed_early_reports_exact_usage(provider: TransformersProvider) -> None:
    """Before: the router estimated it (usage_estimated), missing the chat template's tokens."""
    ctx = RequestContext()
    stream = routed(provider).stream(chat_body(1500, stream=True), context=ctx)
    received = 0
    async for chunk in stream:
        received += sum(1 for c in chunk.choices if c.delta.content)
        if received >= 5:
            break
    await stream.aclose()
    job = await _cancelled_job(provider)
    usage = ctx.usage
    assert usage is not None and not usage.estimated
    assert usage.prompt_tokens == len(job.prompt_ids)
    # The step running when the cancel came may still have added its token.
    assert 5 <= usage.completion_tokens <= len(job.generated) <= usage.completion_tokens + 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert ctx.status == "cancelled"


async def test_a_completion_stream_closed_early_reports_exact_usage(provider: TransformersProvider) -> None:
    ctx = RequestContext()
    body = {"model": "g", "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0, "stream": True}
    stream = routed(provider).stream_complete(body, context=ctx)
    async for _chunk in stream:
        break
    await stream.aclose()
    job = await _cancelled_job(provider)
    assert ctx.usage is not None and not ctx.usage.estimated
    assert ctx.usage.prompt_tokens == len(job.prompt_ids) and ctx.usage.completion_tokens >= 1


async def test_a_character_cut_by_max_tokens_is_left_out(provider: TransformersProvider) -> None:
    """Before: the answer (and the stream's last chunk) ended in U+FFFD."""
    tokenizer = provider.tokenizer
    lead_byte = next(i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\ufffd")
    request = decode_chat_request(chat_body(1, logit_bias={str(lead_byte): 100}))
    response = await provider.chat(request)
    assert (response.choices[0].message.content, response.choices[0].finish_reason) == ("", "length")
    chunks = await collect_stream(provider.stream(request))
    assert [c.delta.content for chunk in chunks for c in chunk.choices] == [""]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 1
