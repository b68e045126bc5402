"""The provider conformance suite: what "a provider works" means, for every provider.

Subclass :class:`ProviderConformance` in a provider's tests, supply an async fixture
named ``provider`` that yields a started provider, and set the class attributes that
describe what it supports::

    class TestRemoteConformance(ProviderConformance):
        supports_completions = True
        deterministic = True

        @pytest.fixture
        async def provider(self):
            async with RemoteProvider("fake-model", base_url=...) as p:
                yield p

The cancellation tests need a request that takes a while: ``slow_max_tokens`` tokens
must take longer than ``cancel_after_s`` (the test fails, rather than passing vacuously,
when the request finished before it could be cancelled). "Promptly" means within
``cancel_bound_s`` — generous, because CI machines are slow and shared.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import anyio
import pytest

from llmrouter.errors import UnsupportedFeatureError
from llmrouter.provider import Capabilities, Health, Provider
from llmrouter.types import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    CompletionChunk,
    CompletionRequest,
    ModelCard,
    Usage,
    decode_chat_request,
    decode_completion_request,
)

__all__ = ["ProviderConformance", "collect_stream"]


async def collect_stream(stream: AsyncIterator[Any], *, limit: int = 10_000) -> list[Any]:
    """Every chunk of a stream (bounded, so a runaway stream fails instead of hanging)."""
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        if len(chunks) > limit:
            raise AssertionError(f"the stream produced more than {limit} chunks")
    return chunks


def _check_usage(usage: Usage | None, where: str) -> Usage:
    assert usage is not None, f"{where}: usage is missing"
    assert usage.prompt_tokens > 0, f"{where}: prompt_tokens must be positive, got {usage}"
    assert usage.completion_tokens >= 0, f"{where}: negative completion_tokens {usage}"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, (
        f"{where}: total_tokens != prompt + completion: {usage}"
    )
    return usage


def _stream_text(chunks: list[ChatChunk]) -> str:
    return "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)


def _check_chat_stream(chunks: list[ChatChunk]) -> tuple[str, str | None, Usage]:
    """Shape checks shared by the stream tests; returns (text, finish_reason, usage)."""
    assert chunks, "the stream yielded no chunk"
    assert all(isinstance(c, ChatChunk) for c in chunks), "stream items must be ChatChunk"
    usage = _check_usage(chunks[-1].usage, "last stream chunk")
    finishes = [
        (i, c.finish_reason) for i, chunk in enumerate(chunks) for c in chunk.choices if c.finish_reason
    ]
    assert len(finishes) == 1, f"exactly one finish_reason expected for one choice, got {finishes}"
    finish_at, finish = finishes[0]
    after = _stream_text(chunks[finish_at + 1 :])
    assert not after, f"content arrived after the finish_reason: {after!r}"
    assert all(c.usage is None for c in chunks[:finish_at]), "usage arrived before the answer finished"
    return _stream_text(chunks), finish, usage


class ProviderConformance:
    """Tests every provider must pass. Subclass it and provide a ``provider`` fixture."""

    pytestmark: ClassVar[Any] = pytest.mark.anyio

    supports_completions: ClassVar[bool] = False
    """The provider serves ``/v1/completions`` (``complete`` / ``stream_complete``)."""
    supports_stop: ClassVar[bool] = True
    """Stop strings end the answer (checked exactly when ``deterministic``)."""
    supports_max_tokens: ClassVar[bool] = True
    """``max_tokens`` ends the answer with ``finish_reason="length"``."""
    deterministic: ClassVar[bool] = False
    """``temperature=0`` (and a seed) gives the same text every time, streamed or not."""
    lists_own_model: ClassVar[bool] = True
    """``list_models()`` includes ``provider.model``."""
    prompt: ClassVar[str] = "Write a long story about a fox and a dog."
    max_tokens: ClassVar[int] = 16
    """Output bound for ordinary requests (keeps CPU models quick)."""
    length_limit: ClassVar[int] = 3
    slow_max_tokens: ClassVar[int] = 256
    """Output bound of the request that the cancellation tests cut short."""
    cancel_after_s: ClassVar[float] = 0.3
    cancel_bound_s: ClassVar[float] = 2.0
    concurrency: ClassVar[int] = 3

    # --- request builders (override to add provider-specific fields) -------------------

    def chat_request(self, provider: Provider[Any], **fields: Any) -> ChatRequest:
        body: dict[str, Any] = {
            "model": provider.model,
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": self.max_tokens,
        }
        if self.deterministic:
            body.update(temperature=0, seed=1234)
        body.update(fields)
        return decode_chat_request(body)

    def completion_request(self, provider: Provider[Any], **fields: Any) -> CompletionRequest:
        body: dict[str, Any] = {"model": provider.model, "prompt": self.prompt, "max_tokens": self.max_tokens}
        if self.deterministic:
            body.update(temperature=0, seed=1234)
        body.update(fields)
        return decode_completion_request(body)

    def slow_chat_request(self, provider: Provider[Any], **fields: Any) -> ChatRequest:
        return self.chat_request(provider, max_tokens=self.slow_max_tokens, **fields)

    # --- chat ---------------------------------------------------------------------------

    async def test_chat_returns_choices_and_usage(self, provider: Provider[Any]) -> None:
        response = await provider.chat(self.chat_request(provider))
        assert isinstance(response, ChatResponse)
        assert response.choices, "chat returned no choices"
        choice = response.choices[0]
        assert choice.message.role == "assistant"
        assert isinstance(choice.message.content, str) and choice.message.content, "empty answer"
        assert choice.finish_reason in ("stop", "length"), choice.finish_reason
        usage = _check_usage(response.usage, "chat")
        assert usage.completion_tokens >= 1
        assert usage.completion_tokens <= self.max_tokens, f"max_tokens={self.max_tokens} exceeded: {usage}"

    async def test_chat_multi_turn_with_system_prompt(self, provider: Provider[Any]) -> None:
        messages = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello."},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": self.prompt},
        ]
        response = await provider.chat(self.chat_request(provider, messages=messages))
        assert response.choices and response.choices[0].message.content
        _check_usage(response.usage, "multi-turn chat")

    async def test_prompt_tokens_grow_with_the_prompt(self, provider: Provider[Any]) -> None:
        short = await provider.chat(self.chat_request(provider, max_tokens=2))
        long_prompt = " ".join([self.prompt] * 8)
        longer = await provider.chat(
            self.chat_request(provider, max_tokens=2, messages=[{"role": "user", "content": long_prompt}])
        )
        assert short.usage is not None and longer.usage is not None
        assert longer.usage.prompt_tokens > short.usage.prompt_tokens, (short.usage, longer.usage)

    async def test_concurrent_chats(self, provider: Provider[Any]) -> None:
        results: list[ChatResponse] = []

        async def one() -> None:
            results.append(await provider.chat(self.chat_request(provider)))

        async with anyio.create_task_group() as tg:
            for _ in range(self.concurrency):
                tg.start_soon(one)
        assert len(results) == self.concurrency
        for response in results:
            assert response.choices and response.choices[0].message.content
            _check_usage(response.usage, "concurrent chat")
        if self.deterministic:
            assert len({r.choices[0].message.content for r in results}) == 1, (
                "same request, different answers"
            )

    # --- streaming ----------------------------------------------------------------------

    async def test_stream_concatenates_and_ends_with_usage(self, provider: Provider[Any]) -> None:
        chunks = await collect_stream(provider.stream(self.chat_request(provider, stream=True)))
        text, finish, usage = _check_chat_stream(chunks)
        assert text, "the streamed deltas concatenate to nothing"
        assert finish in ("stop", "length")
        assert 1 <= usage.completion_tokens <= self.max_tokens, usage
        content_chunks = [c for c in chunks if any(ch.delta.content for ch in c.choices)]
        assert content_chunks, "no chunk carried content"

    async def test_stream_matches_chat(self, provider: Provider[Any]) -> None:
        if not self.deterministic:
            pytest.skip("the provider is not deterministic")
        response = await provider.chat(self.chat_request(provider))
        chunks = await collect_stream(provider.stream(self.chat_request(provider, stream=True)))
        text, finish, usage = _check_chat_stream(chunks)
        assert text == response.choices[0].message.content
        assert finish == response.choices[0].finish_reason
        assert response.usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
        )

    # --- limits -------------------------------------------------------------------------

    async def test_max_tokens_ends_with_length(self, provider: Provider[Any]) -> None:
        if not self.supports_max_tokens:
            pytest.skip("max_tokens is not honoured by this provider")
        limit = self.length_limit
        response = await provider.chat(self.chat_request(provider, max_tokens=limit))
        assert response.choices[0].finish_reason == "length", response.choices[0]
        usage = _check_usage(response.usage, "chat with max_tokens")
        assert 1 <= usage.completion_tokens <= limit, usage
        chunks = await collect_stream(
            provider.stream(self.chat_request(provider, max_tokens=limit, stream=True))
        )
        _, finish, stream_usage = _check_chat_stream(chunks)
        assert finish == "length"
        assert 1 <= stream_usage.completion_tokens <= limit, stream_usage

    async def test_max_completion_tokens_is_honoured(self, provider: Provider[Any]) -> None:
        if not self.supports_max_tokens:
            pytest.skip("max_tokens is not honoured by this provider")
        request = self.chat_request(provider, max_tokens=None, max_completion_tokens=self.length_limit)
        response = await provider.chat(request)
        usage = _check_usage(response.usage, "chat with max_completion_tokens")
        assert usage.completion_tokens <= self.length_limit, usage
        assert response.choices[0].finish_reason == "length"

    async def test_stop_strings_end_the_answer(self, provider: Provider[Any]) -> None:
        if not self.supports_stop:
            pytest.skip("stop strings are not supported by this provider")
        if not self.deterministic:
            pytest.skip("choosing a stop string that will occur needs a deterministic provider")
        full = (await provider.chat(self.chat_request(provider))).choices[0].message.content
        assert isinstance(full, str)
        stop = _pick_stop(full)
        if stop is None:
            pytest.skip(f"the answer is too short to pick a stop string from: {full!r}")
        expected = full[: full.find(stop)]
        response = await provider.chat(self.chat_request(provider, stop=[stop]))
        text = response.choices[0].message.content or ""
        assert stop not in text, f"stop string {stop!r} leaked into {text!r}"
        assert text == expected, f"stop at {stop!r}: expected {expected!r}, got {text!r}"
        assert response.choices[0].finish_reason == "stop"
        chunks = await collect_stream(provider.stream(self.chat_request(provider, stop=[stop], stream=True)))
        streamed, finish, _ = _check_chat_stream(chunks)
        assert streamed == expected, f"streamed with stop {stop!r}: expected {expected!r}, got {streamed!r}"
        assert finish == "stop"

    # --- cancellation -------------------------------------------------------------------

    async def test_closing_a_stream_early_is_prompt(self, provider: Provider[Any]) -> None:
        stream = provider.stream(self.slow_chat_request(provider, stream=True))
        aclose = getattr(stream, "aclose", None)
        assert aclose is not None, "provider.stream must return an async generator (with aclose)"
        first = await stream.__anext__()
        assert isinstance(first, ChatChunk)
        started = time.monotonic()
        with anyio.fail_after(self.cancel_bound_s):
            await aclose()
        assert time.monotonic() - started < self.cancel_bound_s
        await self._still_serves(provider)

    async def test_cancelling_a_stream_is_prompt(self, provider: Provider[Any]) -> None:
        received = 0
        with anyio.move_on_after(self.cancel_after_s) as scope:
            async for _ in provider.stream(self.slow_chat_request(provider, stream=True)):
                received += 1
        self._check_cancelled(scope, "stream")
        await self._still_serves(provider)

    async def test_cancelling_a_chat_is_prompt(self, provider: Provider[Any]) -> None:
        started = time.monotonic()
        with anyio.move_on_after(self.cancel_after_s) as scope:
            await provider.chat(self.slow_chat_request(provider))
        self._check_cancelled(scope, "chat")
        overrun = time.monotonic() - started - self.cancel_after_s
        assert overrun < self.cancel_bound_s, f"chat returned {overrun:.2f}s after being cancelled"
        await self._still_serves(provider)

    def _check_cancelled(self, scope: anyio.CancelScope, what: str) -> None:
        if not scope.cancelled_caught:
            pytest.fail(
                f"the slow {what} finished within {self.cancel_after_s}s, so cancellation was not tested: "
                "raise slow_max_tokens or lower cancel_after_s"
            )

    async def _still_serves(self, provider: Provider[Any]) -> None:
        with anyio.fail_after(max(30.0, self.cancel_bound_s * 10)):
            response = await provider.chat(self.chat_request(provider, max_tokens=self.length_limit))
        assert response.choices and response.choices[0].message.content

    # --- models, health, capabilities ---------------------------------------------------

    async def test_list_models(self, provider: Provider[Any]) -> None:
        models = await provider.list_models()
        assert models, "list_models returned nothing"
        assert all(isinstance(m, ModelCard) and m.id for m in models)
        if self.lists_own_model:
            assert provider.model in {m.id for m in models}, (provider.model, models)

    async def test_health(self, provider: Provider[Any]) -> None:
        health = await provider.health()
        assert isinstance(health, Health)
        assert health.ok, health.detail
        assert health.latency_ms is None or health.latency_ms >= 0

    async def test_capabilities_match_the_suite(self, provider: Provider[Any]) -> None:
        capabilities = provider.capabilities
        assert isinstance(capabilities, Capabilities)
        assert capabilities.streaming
        assert capabilities.completions == self.supports_completions

    # --- legacy completions -------------------------------------------------------------

    async def test_completions(self, provider: Provider[Any]) -> None:
        request = self.completion_request(provider)
        if not self.supports_completions:
            with pytest.raises(UnsupportedFeatureError):
                await provider.complete(request)
            return
        response = await provider.complete(request)
        assert response.choices and response.choices[0].text, "empty completion"
        assert response.choices[0].finish_reason in ("stop", "length")
        usage = _check_usage(response.usage, "completion")
        assert 1 <= usage.completion_tokens <= self.max_tokens

    async def test_stream_completions(self, provider: Provider[Any]) -> None:
        if not self.supports_completions:
            pytest.skip("completions are not supported by this provider")
        chunks = await collect_stream(
            provider.stream_complete(self.completion_request(provider, stream=True))
        )
        assert chunks and all(isinstance(c, CompletionChunk) for c in chunks)
        text = "".join(c.text for chunk in chunks for c in chunk.choices)
        assert text, "the streamed completion is empty"
        usage = _check_usage(chunks[-1].usage, "last completion chunk")
        assert 1 <= usage.completion_tokens <= self.max_tokens
        if self.deterministic:
            response = await provider.complete(self.completion_request(provider))
            assert text == response.choices[0].text

    async def test_completion_max_tokens_ends_with_length(self, provider: Provider[Any]) -> None:
        if not (self.supports_completions and self.supports_max_tokens):
            pytest.skip("completions with max_tokens are not supported by this provider")
        response = await provider.complete(self.completion_request(provider, max_tokens=self.length_limit))
        assert response.choices[0].finish_reason == "length"
        usage = _check_usage(response.usage, "completion with max_tokens")
        assert usage.completion_tokens <= self.length_limit


def _pick_stop(text: str) -> str | None:
    """A 3-character piece from the second half of ``text`` whose first occurrence isn't at 0."""
    if len(text) < 8:
        return None
    for start in range(len(text) // 2, len(text) - 3):
        stop = text[start : start + 3]
        if stop.strip() and text.find(stop) > 0:
            return stop
    return None
