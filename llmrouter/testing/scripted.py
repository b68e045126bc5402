"""An in-process provider driven by a script, for tests of routing, hooks and caching.

``ScriptedProvider`` answers from a queue of :class:`Step` objects (then from its
default step), records every call, and notices cancellation, so a test can check that
a retry went elsewhere, a timeout fired, or a cancelled caller really stopped it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio

from llmrouter.errors import LLMRouterError
from llmrouter.provider import Capabilities, Provider
from llmrouter.types import (
    ChatChoice,
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ChunkChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Delta,
    Usage,
    message_text,
    new_id,
    now,
)

__all__ = ["ScriptedProvider", "Step"]


@dataclass
class Step:
    """What one call does.

    Args:
        text: the answer; streamed as one chunk per word.
        error: raise this instead (before the first chunk, or after ``fail_after_chunks``).
        delay: seconds to wait before answering (before the first chunk when streaming).
        chunk_delay: seconds between stream chunks.
        fail_after_chunks: stream this many chunks, then raise ``error``.
        usage: report this usage (default: words counted, not estimated); ``False`` to omit.
        echo: answer with the last user message instead of ``text``.
    """

    text: str = "Hello from the scripted provider."
    error: LLMRouterError | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    fail_after_chunks: int | None = None
    usage: Usage | bool | None = None
    echo: bool = False


@dataclass
class _Record:
    calls: int = 0
    cancelled: int = 0
    completed: int = 0
    chunks_sent: int = 0
    requests: list[ChatRequest | CompletionRequest] = field(default_factory=list)


class ScriptedProvider(Provider):
    """A provider whose answers, errors and delays come from a script."""

    name = "scripted"
    direct = True

    def __init__(
        self,
        model: str = "scripted-model",
        options: Any = None,
        *,
        steps: Iterable[Step] = (),
        default: Step | None = None,
        capabilities: Capabilities | None = None,
    ) -> None:
        super().__init__(model, options)
        self.steps: deque[Step] = deque(steps)
        self.default = default or Step()
        self.record = _Record()
        self._capabilities = capabilities or Capabilities(
            tools=True, json_mode=True, vision=True, completions=True
        )
        self.started = False
        self.closed = False

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    async def start(self) -> None:
        self.started = True

    async def aclose(self) -> None:
        self.closed = True

    def _next_step(self, request: ChatRequest | CompletionRequest) -> Step:
        self.record.calls += 1
        self.record.requests.append(request)
        return self.steps.popleft() if self.steps else self.default

    @staticmethod
    def _text(step: Step, request: ChatRequest | CompletionRequest) -> str:
        if not step.echo:
            return step.text
        if isinstance(request, ChatRequest):
            return message_text(request.messages[-1])
        return request.prompt if isinstance(request.prompt, str) else ""

    @staticmethod
    def _usage(step: Step, request: ChatRequest | CompletionRequest, text: str) -> Usage | None:
        if step.usage is False:
            return None
        if isinstance(step.usage, Usage):
            return step.usage
        if isinstance(request, ChatRequest):
            prompt = sum(len(message_text(m).split()) for m in request.messages)
        else:
            prompt = len(str(request.prompt).split())
        completion = len(text.split())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def _wait(self, seconds: float) -> None:
        if seconds <= 0:
            return
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            self.record.cancelled += 1
            raise

    async def chat(self, request: ChatRequest) -> ChatResponse:
        step = self._next_step(request)
        await self._wait(step.delay)
        if step.error is not None:
            raise step.error
        text = self._text(step, request)
        self.record.completed += 1
        return ChatResponse(
            id=new_id(),
            created=now(),
            model=request.model,
            choices=[ChatChoice(message=ChatMessage(role="assistant", content=text), finish_reason="stop")],
            usage=self._usage(step, request, text),
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        step = self._next_step(request)
        await self._wait(step.delay)
        if step.error is not None and step.fail_after_chunks is None:
            raise step.error
        text = self._text(step, request)
        chunk_id, created = new_id(), now()
        words = text.split(" ")
        try:
            for i, word in enumerate(words):
                if step.fail_after_chunks is not None and i >= step.fail_after_chunks:
                    assert step.error is not None
                    raise step.error
                if i:
                    await self._wait(step.chunk_delay)
                piece = word if i == 0 else " " + word
                delta = Delta(role="assistant", content=piece) if i == 0 else Delta(content=piece)
                self.record.chunks_sent += 1
                yield ChatChunk(
                    id=chunk_id, created=created, model=request.model, choices=[ChunkChoice(delta=delta)]
                )
            yield ChatChunk(
                id=chunk_id,
                created=created,
                model=request.model,
                choices=[ChunkChoice(delta=Delta(), finish_reason="stop")],
            )
            usage = self._usage(step, request, text)
            if usage is not None:
                yield ChatChunk(id=chunk_id, created=created, model=request.model, choices=[], usage=usage)
            self.record.completed += 1
        except GeneratorExit:
            self.record.cancelled += 1
            raise

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        step = self._next_step(request)
        await self._wait(step.delay)
        if step.error is not None:
            raise step.error
        text = self._text(step, request)
        self.record.completed += 1
        return CompletionResponse(
            id=new_id("cmpl"),
            created=now(),
            model=request.model,
            choices=[CompletionChoice(text=text, finish_reason="stop")],
            usage=self._usage(step, request, text),
        )

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        step = self._next_step(request)
        await self._wait(step.delay)
        if step.error is not None:
            raise step.error
        text = self._text(step, request)
        chunk_id, created = new_id("cmpl"), now()
        for i, word in enumerate(text.split(" ")):
            yield CompletionChunk(
                id=chunk_id,
                created=created,
                model=request.model,
                choices=[CompletionChoice(text=word if i == 0 else " " + word)],
            )
        yield CompletionChunk(
            id=chunk_id,
            created=created,
            model=request.model,
            choices=[CompletionChoice(text="", finish_reason="stop")],
        )
        usage = self._usage(step, request, text)
        if usage is not None:
            yield CompletionChunk(id=chunk_id, created=created, model=request.model, choices=[], usage=usage)
        self.record.completed += 1
