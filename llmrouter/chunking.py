"""A chat answer's two shapes: the one response a request gets, and the chunks of a stream.

Assembling a stream's chunks into a response, and re-chunking a response the way an
OpenAI stream sends it: for the cache (a stored answer serves either kind of request),
for coalesced requests, and for an upstream that answers a stream request with one JSON
body (:mod:`llmrouter.openai_compat`).
"""

from __future__ import annotations

from typing import Any

from llmrouter.types import (
    ChatChoice,
    ChatChunk,
    ChatMessage,
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
            slot = self.tool_calls.setdefault(
                call.index, {"id": None, "type": "function", "name": "", "arguments": []}
            )
            slot["id"] = slot["id"] or call.id
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
            )
            if slot["type"] == "custom"
            else ToolCall(
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
            )
            if call.custom is not None
            else ToolCallDelta(
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
    if response.usage is not None:
        out.append(chunk([], usage=response.usage))
    return out
