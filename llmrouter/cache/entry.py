"""What a cache entry holds, and how answers move between their two shapes.

A non-streamed answer is stored as its :class:`~llmrouter.types.ChatResponse`; a
streamed one as the exact list of chunks it arrived in, so that replaying it gives a
streaming client the same format (chunk boundaries, role chunk, final usage chunk).
Either shape can serve either kind of request: chunks are assembled into a response
for a non-streaming hit, and a response is re-chunked for a streaming hit.
"""

from __future__ import annotations

import operator
import time
from itertools import chain
from typing import Any

import msgspec

from llmrouter.types import (
    ChatChoice,
    ChatChunk,
    ChatMessage,
    ChatResponse,
    ChunkChoice,
    Delta,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)

__all__ = [
    "CacheEntry",
    "chunks_from_response",
    "decode_entry",
    "encode_entry",
    "is_storable",
    "last_usage",
    "response_from_chunks",
]

# Answers that ended for any of these reasons are not the answer to the request.
_INCOMPLETE_REASONS = frozenset({"cancelled", "canceled", "abort", "aborted", "error"})


class CacheEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One stored answer: exactly one of ``response`` / ``chunks`` is set."""

    response: ChatResponse | None = None
    chunks: list[ChatChunk] | None = None
    stored_at: float = 0.0
    """Unix seconds when it was stored (for ``Age``-style reporting and debugging)."""

    def as_response(self) -> ChatResponse:
        if self.response is not None:
            return self.response
        return response_from_chunks(self.chunks or [])

    def as_chunks(self) -> list[ChatChunk]:
        if self.chunks is not None:
            return self.chunks
        return chunks_from_response(self.response or ChatResponse())

    @property
    def usage(self) -> Usage | None:
        if self.response is not None:
            return self.response.usage
        return last_usage(self.chunks or [])


def last_usage(chunks: list[ChatChunk]) -> Usage | None:
    """The usage of the last chunk that carries one (a stream reports it at its end)."""
    for chunk in reversed(chunks):
        if chunk.usage is not None:
            return chunk.usage
    return None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CacheEntry)


def encode_entry(*, response: ChatResponse | None = None, chunks: list[ChatChunk] | None = None) -> bytes:
    """Encode an answer for storage (msgpack: compact and fast to decode)."""
    return _encoder.encode(CacheEntry(response=response, chunks=chunks, stored_at=time.time()))


def decode_entry(data: bytes) -> CacheEntry:
    """Decode a stored entry; raises ``msgspec.DecodeError`` for foreign or stale bytes."""
    entry = _decoder.decode(data)
    if (entry.response is None) == (entry.chunks is None):
        raise msgspec.DecodeError("cache entry holds neither or both answer shapes")
    return entry


def is_storable(answer: ChatResponse | list[ChatChunk], *, store_truncated: bool = False) -> bool:
    """True when every choice finished normally (never errors, cancels or cut-offs).

    ``answer`` is a response, or the chunks of a streamed one: their finish reasons are
    read without assembling the answer (that costs ten times more).
    """
    if isinstance(answer, ChatResponse):
        reasons = [choice.finish_reason for choice in answer.choices]
    else:
        reasons = _last_finish_reasons(answer)
    if not reasons:
        return False
    for reason in reasons:
        if reason is None or reason in _INCOMPLETE_REASONS:
            return False
        if reason == "length" and not store_truncated:
            return False
    return True


_choices_of = operator.attrgetter("choices")
_index_of = operator.attrgetter("index")


def _last_finish_reasons(chunks: list[ChatChunk]) -> list[str | None]:
    """Per choice, its last finish reason (as the assembled answer would carry it), or
    None when it never got one. The choices are listed in C; the reasons are read from
    the end, where they are (this runs at the end of every stream that may be stored)."""
    indexes = set(map(_index_of, chain.from_iterable(map(_choices_of, chunks))))
    found: dict[int, str] = {}
    for chunk in reversed(chunks):
        for choice in chunk.choices:
            if choice.finish_reason is not None and choice.index not in found:
                found[choice.index] = choice.finish_reason
        if len(found) == len(indexes):
            break
    return [found.get(index) for index in indexes]


class _ChoiceBuilder:
    """Accumulates one choice's deltas."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.role: Any = None
        self.content: list[str] = []
        self.reasoning_content: list[str] = []
        self.reasoning: list[str] = []
        self.reasoning_details: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.refusal: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.logprobs: dict[str, Any] | None = None

    def add(self, choice: ChunkChoice) -> None:
        delta = choice.delta
        self.role = self.role or delta.role
        if delta.content:
            self.content.append(delta.content)
        if delta.reasoning_content:
            self.reasoning_content.append(delta.reasoning_content)
        if delta.reasoning:
            self.reasoning.append(delta.reasoning)
        if delta.reasoning_details:
            self.reasoning_details.extend(delta.reasoning_details)
        if delta.annotations:
            self.annotations.extend(delta.annotations)
        if delta.refusal:
            self.refusal.append(delta.refusal)
        for call in delta.tool_calls or ():
            slot = self.tool_calls.setdefault(call.index, {"id": None, "name": "", "arguments": []})
            slot["id"] = slot["id"] or call.id
            if call.function is not None:
                slot["name"] += call.function.name or ""
                if call.function.arguments:
                    slot["arguments"].append(call.function.arguments)
        if choice.finish_reason is not None:
            self.finish_reason = choice.finish_reason
        if choice.logprobs:
            self._merge_logprobs(choice.logprobs)

    def _merge_logprobs(self, logprobs: dict[str, Any]) -> None:
        if self.logprobs is None:
            self.logprobs = {}
        for name, value in logprobs.items():
            if isinstance(value, list) and isinstance(self.logprobs.get(name), list):
                self.logprobs[name] = [*self.logprobs[name], *value]
            else:
                self.logprobs[name] = value

    def build(self) -> ChatChoice:
        tool_calls = [
            ToolCall(
                id=slot["id"] or f"call_{index}",
                function=FunctionCall(name=slot["name"], arguments="".join(slot["arguments"])),
            )
            for index, slot in sorted(self.tool_calls.items())
        ]
        message = ChatMessage(
            role=self.role or "assistant",
            content="".join(self.content) if self.content or not tool_calls else None,
            tool_calls=tool_calls or None,
            refusal="".join(self.refusal) or None,
            reasoning_content="".join(self.reasoning_content) or None,
            reasoning="".join(self.reasoning) or None,
            reasoning_details=self.reasoning_details or None,
            annotations=self.annotations or None,
        )
        return ChatChoice(
            index=self.index, message=message, finish_reason=self.finish_reason, logprobs=self.logprobs
        )


def response_from_chunks(chunks: list[ChatChunk]) -> ChatResponse:
    """Assemble a streamed answer into the response a non-streaming request gets."""
    builders: dict[int, _ChoiceBuilder] = {}
    head: ChatChunk | None = None
    usage: Usage | None = None
    fingerprint: str | None = None
    for chunk in chunks:
        if head is None and chunk.id:
            head = chunk
        fingerprint = fingerprint or chunk.system_fingerprint
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            builder = builders.get(choice.index)
            if builder is None:
                builder = builders[choice.index] = _ChoiceBuilder(choice.index)
            builder.add(choice)
    head = head or (chunks[0] if chunks else ChatChunk())
    return ChatResponse(
        id=head.id,
        created=head.created,
        model=head.model,
        choices=[builders[i].build() for i in sorted(builders)],
        usage=usage,
        system_fingerprint=fingerprint,
    )


def chunks_from_response(response: ChatResponse) -> list[ChatChunk]:
    """Re-chunk a response the way an OpenAI stream sends it: one content chunk per
    choice, then one finish chunk per choice, then the usage chunk."""

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> ChatChunk:
        return ChatChunk(
            id=response.id,
            created=response.created,
            model=response.model,
            choices=choices,
            usage=usage,
            system_fingerprint=response.system_fingerprint,
        )

    out: list[ChatChunk] = []
    for choice in response.choices:
        message = choice.message
        calls = [
            ToolCallDelta(
                index=i,
                id=call.id,
                type="function",
                function=FunctionCallDelta(name=call.function.name, arguments=call.function.arguments),
            )
            for i, call in enumerate(message.tool_calls or ())
        ]
        content = message.content if isinstance(message.content, str) else None
        if message.content is not None and not isinstance(message.content, str):
            content = "".join(getattr(part, "text", "") for part in message.content)
        delta = Delta(
            role=message.role,
            content=content,
            tool_calls=calls or None,
            refusal=message.refusal,
            reasoning_content=message.reasoning_content,
            reasoning=message.reasoning,
            reasoning_details=message.reasoning_details,
            annotations=message.annotations,
        )
        out.append(chunk([ChunkChoice(index=choice.index, delta=delta, logprobs=choice.logprobs)]))
    for choice in response.choices:
        out.append(
            chunk([ChunkChoice(index=choice.index, delta=Delta(), finish_reason=choice.finish_reason)])
        )
    out.append(chunk([], usage=response.usage or Usage()))
    return out
