"""Fixtures for the cache tests: backends (Redis for real), and a counting fake upstream."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from llmrouter.cache import MemoryBackend, ResponseCache
from llmrouter.context import RequestContext
from llmrouter.types import (
    ChatChoice,
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ChunkChoice,
    Delta,
    Usage,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


class FakeClock:
    """Seconds that only move when a test moves them."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Upstream:
    """A counting upstream behind the cache: ``call()`` / ``stream()`` produce the
    ``call`` closures the router would pass, optionally held at a gate.

    Attributes:
        calls: how many upstream calls started.
        cancelled: how many were cancelled (chat) or closed early (stream).
        completed: how many ran to the end.
        gate: when set, upstream waits for it before answering (chat) or before each
            chunk after the first (stream).
    """

    def __init__(
        self, words: tuple[str, ...] = ("Paris", " is", " the", " capital."), *, finish_reason: str = "stop"
    ) -> None:
        self.words = words
        self.finish_reason = finish_reason
        self.calls = 0
        self.cancelled = 0
        self.completed = 0
        self.gate: anyio.Event | None = None
        self.error: Exception | None = None
        self.usage = Usage(prompt_tokens=7, completion_tokens=len(words), total_tokens=7 + len(words))

    def hold(self) -> anyio.Event:
        self.gate = anyio.Event()
        return self.gate

    def response(self) -> ChatResponse:
        return ChatResponse(
            id="chatcmpl-fixed",
            created=1_700_000_000,
            model="upstream-model",
            choices=[
                ChatChoice(
                    message=ChatMessage(role="assistant", content="".join(self.words)),
                    finish_reason=self.finish_reason,
                )
            ],
            usage=self.usage,
        )

    def chunks(self) -> list[ChatChunk]:
        def chunk(**kwargs: Any) -> ChatChunk:
            return ChatChunk(id="chatcmpl-fixed", created=1_700_000_000, model="upstream-model", **kwargs)

        out = [chunk(choices=[ChunkChoice(delta=Delta(role="assistant", content=self.words[0]))])]
        out += [chunk(choices=[ChunkChoice(delta=Delta(content=w))]) for w in self.words[1:]]
        out.append(chunk(choices=[ChunkChoice(delta=Delta(), finish_reason=self.finish_reason)]))
        out.append(chunk(choices=[], usage=self.usage))
        return out

    def call(self, ctx: RequestContext | None = None) -> Callable[[], Any]:
        async def call() -> ChatResponse:
            self.calls += 1
            try:
                if self.gate is not None:
                    await self.gate.wait()
            except anyio.get_cancelled_exc_class():
                self.cancelled += 1
                raise
            if self.error is not None:
                raise self.error
            if ctx is not None:  # what the router's dispatch fills in
                ctx.deployment, ctx.provider, ctx.usage = "fake/upstream-model", "fake", self.usage
            self.completed += 1
            return self.response()

        return call

    def stream(self, ctx: RequestContext | None = None) -> Callable[[], AsyncIterator[ChatChunk]]:
        async def stream() -> AsyncIterator[ChatChunk]:
            self.calls += 1
            finished = False
            try:
                for i, chunk in enumerate(self.chunks()):
                    if i and self.gate is not None:
                        await self.gate.wait()
                    if self.error is not None and i == 2:
                        raise self.error
                    yield chunk
                if ctx is not None:
                    ctx.deployment, ctx.provider, ctx.usage = "fake/upstream-model", "fake", self.usage
                finished = True
                self.completed += 1
            finally:
                if not finished:
                    self.cancelled += 1

        return stream


def chat_request(content: str = "What is the capital of France?", **fields: Any) -> ChatRequest:
    fields.setdefault("temperature", 0.0)
    return ChatRequest(model="g", messages=[ChatMessage(role="user", content=content)], **fields)


def new_ctx(**fields: Any) -> RequestContext:
    fields.setdefault("model_group", "g")
    return RequestContext(**fields)


async def wait_until(predicate: Callable[[], bool], *, steps: int = 1000) -> None:
    """Yield to the event loop until ``predicate`` holds (bounded: fails after ~10 s)."""
    for _ in range(steps):
        if predicate():
            return
        await anyio.sleep(0.01)
    raise AssertionError("condition not reached")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture
def cache() -> ResponseCache:
    return ResponseCache(MemoryBackend(), ttl=60)


@pytest.fixture
def helpers() -> Any:
    """The module's helpers, for test files (importlib mode can't import conftest)."""

    class Helpers:
        Upstream = Upstream
        FakeClock = FakeClock
        chat_request = staticmethod(chat_request)
        new_ctx = staticmethod(new_ctx)
        wait_until = staticmethod(wait_until)

    return Helpers


@pytest.fixture
def redis_prefix() -> str:
    return f"llmrouter-test:{uuid.uuid4().hex}:"


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "cache.db"
