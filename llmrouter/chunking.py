"""A chat answer's two shapes: the one response a request gets, and the chunks of a stream.

Assembling a stream's chunks into a response, and re-chunking a response the way an
OpenAI stream sends it: for the cache (a stored answer serves either kind of request),
for coalesced requests, and for an upstream that answers a stream request with one JSON
body (:mod:`llmrouter.openai_compat`).
"""

from __future__ import annotations

from typing import Any

from msgspec import UNSET, UnsetType

from llmrouter.types import (
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatResponse,
    ChunkChoice,
    CustomCall,
    CustomCallDelta,
    Delta,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)

__all__ = ["chunks_from_response", "response_from_chunks"]


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
        # The deprecated function_call's name and arguments, in pieces (None: no call).
        self.function_name: list[str] | None = None
        self.function_arguments: list[str] = []
        self.audio: dict[str, Any] | None = None
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
        if delta.function_call is not None:
            if self.function_name is None:
                self.function_name = []
            self.function_name.append(delta.function_call.name or "")
            if delta.function_call.arguments:
                self.function_arguments.append(delta.function_call.arguments)
        if delta.audio is not None:
            self._merge_audio(delta.audio)
        for call in delta.tool_calls or ():
            slot = self.tool_calls.setdefault(
                call.index,
                {"id": None, "type": "function", "name": "", "arguments": [], "extra_content": None},
            )
            slot["id"] = slot["id"] or call.id
            if call.extra_content:  # Gemini's thought signature
                slot["extra_content"] = {**(slot["extra_content"] or {}), **call.extra_content}
            if call.type == "custom":
                slot["type"] = "custom"
            if call.function is not None:
                slot["name"] += call.function.name or ""
                if call.function.arguments:
                    slot["arguments"].append(call.function.arguments)
            elif call.custom:  # a custom tool's call: its input comes in pieces, as arguments do
                slot["type"] = "custom"
                slot["name"] += call.custom.name or ""
                if call.custom.input:
                    slot["arguments"].append(call.custom.input)
        if choice.finish_reason is not None:
            self.finish_reason = choice.finish_reason
        if choice.logprobs:
            self._merge_logprobs(choice.logprobs)

    def _merge_audio(self, audio: dict[str, Any]) -> None:
        # A streamed audio answer comes as pieces of ``data`` and ``transcript``; its
        # ``id`` and ``expires_at`` come whole.
        if self.audio is None:
            self.audio = {}
        for name, value in audio.items():
            held = self.audio.get(name)
            if name in ("data", "transcript") and isinstance(value, str) and isinstance(held, str):
                self.audio[name] = held + value
            else:
                self.audio[name] = value

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
                type="custom",
                custom=CustomCall(name=slot["name"], input="".join(slot["arguments"])),
                extra_content=slot["extra_content"],
            )
            if slot["type"] == "custom"
            else ToolCall(
                id=slot["id"] or f"call_{index}",
                function=FunctionCall(name=slot["name"], arguments="".join(slot["arguments"])),
                extra_content=slot["extra_content"],
            )
            for index, slot in sorted(self.tool_calls.items())
        ]
        function_call = (
            None
            if self.function_name is None
            else FunctionCall(name="".join(self.function_name), arguments="".join(self.function_arguments))
        )
        # Content is null, not "", beside a call, audio or a refusal (as OpenAI answers them).
        called = tool_calls or function_call is not None or self.audio is not None or self.refusal
        message = AssistantMessage(
            role=self.role or "assistant",
            content="".join(self.content) if self.content or not called else None,
            tool_calls=tool_calls or None,
            function_call=function_call,
            audio=self.audio,
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
    tier: str | UnsetType | None = UNSET
    for chunk in chunks:
        if head is None and chunk.id:
            head = chunk
        fingerprint = fingerprint or chunk.system_fingerprint
        if tier is UNSET:
            tier = chunk.service_tier
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
        service_tier=tier,
    )


def chunks_from_response(response: ChatResponse) -> list[ChatChunk]:
    """Re-chunk a response the way an OpenAI stream sends it: one content chunk per
    choice, then one finish chunk per choice, then the usage chunk when the response has
    usage. An answer stored without usage gets no usage chunk: a chunk of zeros would be
    taken as the answer's real usage, where without one the router counts the tokens (as
    it does for a non-streaming hit of the same answer)."""

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> ChatChunk:
        return ChatChunk(
            id=response.id,
            created=response.created,
            model=response.model,
            choices=choices,
            usage=usage,
            system_fingerprint=response.system_fingerprint,
            service_tier=response.service_tier,
        )

    out: list[ChatChunk] = []
    for choice in response.choices:
        message = choice.message
        calls = [
            ToolCallDelta(
                index=i,
                id=call.id,
                type="custom",
                custom=CustomCallDelta(name=call.custom.name, input=call.custom.input),
                extra_content=UNSET if call.extra_content is None else call.extra_content,
            )
            if call.custom is not None
            else ToolCallDelta(
                index=i,
                id=call.id,
                type="function",
                function=FunctionCallDelta(name=call.function.name, arguments=call.function.arguments),
                extra_content=UNSET if call.extra_content is None else call.extra_content,
            )
            for i, call in enumerate(message.tool_calls or ())
        ]
        function_call = message.function_call
        content = message.content if isinstance(message.content, str) else None
        if message.content is not None and not isinstance(message.content, str):
            content = "".join(getattr(part, "text", "") for part in message.content)
        delta = Delta(
            role=message.role,
            content=content,
            tool_calls=calls or None,
            function_call=None
            if function_call is None
            else FunctionCallDelta(name=function_call.name, arguments=function_call.arguments),
            audio=message.audio,
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
    if response.usage is not None:
        out.append(chunk([], usage=response.usage))
    return out
