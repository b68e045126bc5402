"""Stored answers: encoding, and moving between the response and chunk shapes."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from llmrouter.cache.entry import decode_entry, encode_entry, is_storable
from llmrouter.chunking import chunks_from_response, response_from_chunks
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


def test_roundtrip_keeps_chunks_exactly(helpers: Any) -> None:
    chunks = helpers.Upstream().chunks()
    entry = decode_entry(encode_entry(chunks=chunks))
    assert entry.chunks == chunks
    assert entry.usage == chunks[-1].usage
    assert entry.stored_at > 0


def test_the_fallback_group_that_served_is_kept_and_old_entries_have_none(helpers: Any) -> None:
    response = helpers.Upstream().response()
    assert decode_entry(encode_entry(response=response, group="backup")).group == "backup"
    old = msgspec.msgpack.encode({"response": response, "stored_at": 1.0})  # stored before the field
    assert decode_entry(old).group is None


def test_assembled_stream_equals_the_response(helpers: Any) -> None:
    upstream = helpers.Upstream()
    assert response_from_chunks(upstream.chunks()) == upstream.response()


def test_rechunked_response_reassembles_to_itself(helpers: Any) -> None:
    response = helpers.Upstream().response()
    chunks = chunks_from_response(response)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == response.usage
    assert all(c.object == "chat.completion.chunk" and c.id == response.id for c in chunks)
    assert response_from_chunks(chunks) == response


def test_rechunked_response_without_usage_sends_no_usage_chunk(helpers: Any) -> None:
    # A chunk of zeros would be billed as the answer's usage; without one the router counts it.
    response = msgspec.structs.replace(helpers.Upstream().response(), usage=None)
    chunks = chunks_from_response(response)
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert response_from_chunks(chunks) == response


def test_tool_calls_assemble_from_deltas() -> None:
    def chunk(delta: Delta, finish: str | None = None) -> ChatChunk:
        return ChatChunk(id="c", model="m", choices=[ChunkChoice(delta=delta, finish_reason=finish)])

    chunks = [
        chunk(
            Delta(
                role="assistant",
                tool_calls=[
                    ToolCallDelta(
                        index=0,
                        id="call_1",
                        type="function",
                        function=FunctionCallDelta(name="get", arguments='{"ci'),
                    )
                ],
            )
        ),
        chunk(
            Delta(tool_calls=[ToolCallDelta(index=0, function=FunctionCallDelta(arguments='ty":"Paris"}'))])
        ),
        chunk(
            Delta(
                tool_calls=[
                    ToolCallDelta(
                        index=1, id="call_2", function=FunctionCallDelta(name="now", arguments="{}")
                    )
                ]
            )
        ),
        chunk(Delta(), "tool_calls"),
        ChatChunk(id="c", model="m", usage=Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)),
    ]
    response = response_from_chunks(chunks)
    message = response.choices[0].message
    assert message.content is None
    assert message.tool_calls == [
        ToolCall(id="call_1", function=FunctionCall(name="get", arguments='{"city":"Paris"}')),
        ToolCall(id="call_2", function=FunctionCall(name="now", arguments="{}")),
    ]
    assert response.choices[0].finish_reason == "tool_calls"
    assert response_from_chunks(chunks_from_response(response)) == response


def test_reasoning_and_citations_assemble_from_deltas() -> None:
    # OpenRouter's spelling (reasoning, reasoning_details, annotations) and vLLM's
    # (reasoning_content), each kept as sent.
    def chunk(delta: Delta, finish: str | None = None) -> ChatChunk:
        return ChatChunk(id="c", model="m", choices=[ChunkChoice(delta=delta, finish_reason=finish)])

    detail = {"type": "reasoning.text", "format": "unknown", "index": 0}
    citation = {"type": "url_citation", "url_citation": {"url": "https://example.com", "title": "Example"}}
    chunks = [
        chunk(Delta(role="assistant", reasoning="Think", reasoning_details=[{**detail, "text": "Think"}])),
        chunk(
            Delta(reasoning=" hard", reasoning_details=[{**detail, "text": " hard"}], reasoning_content="r")
        ),
        chunk(Delta(content="Paris", annotations=[citation])),
        chunk(Delta(), "stop"),
        ChatChunk(id="c", model="m", usage=Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)),
    ]
    message = response_from_chunks(chunks).choices[0].message
    assert (message.content, message.reasoning, message.reasoning_content) == ("Paris", "Think hard", "r")
    assert message.reasoning_details == [{**detail, "text": "Think"}, {**detail, "text": " hard"}]
    assert message.annotations == [citation]
    response = response_from_chunks(chunks)
    assert response_from_chunks(chunks_from_response(response)) == response


def test_several_choices_keep_their_index() -> None:
    response = ChatResponse(
        id="r",
        model="m",
        choices=[
            ChatChoice(index=0, message=ChatMessage(role="assistant", content="a"), finish_reason="stop"),
            ChatChoice(index=1, message=ChatMessage(role="assistant", content="b"), finish_reason="stop"),
        ],
        usage=Usage(total_tokens=2),
    )
    assert response_from_chunks(chunks_from_response(response)) == response


@pytest.mark.parametrize(
    ("reasons", "truncated_ok", "storable"),
    [
        (["stop"], False, True),
        (["tool_calls"], False, True),
        (["stop", "stop"], False, True),
        ([None], False, False),  # the stream never finished
        (["cancelled"], False, False),
        (["abort"], False, False),
        (["error"], False, False),
        (["stop", None], False, False),
        (["length"], False, False),
        (["length"], True, True),
        ([], False, False),
    ],
)
def test_storable_only_when_every_choice_finished(
    reasons: list[str | None], truncated_ok: bool, storable: bool
) -> None:
    response = ChatResponse(choices=[ChatChoice(index=i, finish_reason=r) for i, r in enumerate(reasons)])
    assert is_storable(response, store_truncated=truncated_ok) is storable
    # the same answer streamed: read from its chunks, as assembling them would
    assert is_storable(chunks_from_response(response), store_truncated=truncated_ok) is storable


def _interleaved(*steps: tuple[int, str | None]) -> list[ChatChunk]:
    """A stream whose chunks carry one choice each, (index, finish_reason) in order."""
    return [
        ChatChunk(
            id="c", model="m", choices=[ChunkChoice(index=i, delta=Delta(content="x"), finish_reason=r)]
        )
        for i, r in steps
    ]


@pytest.mark.parametrize(
    ("chunks", "storable"),
    [
        # choices finish at different points; a usage chunk without choices at the end
        (
            [
                *_interleaved((0, None), (1, None), (1, "stop"), (0, None), (0, "stop")),
                ChatChunk(usage=Usage()),
            ],
            True,
        ),
        # choice 1 only ever appears early, and never finishes
        (_interleaved((1, None), (0, None), (0, "stop")), False),
        # a finish reason followed by empty deltas of the same choice still counts
        (_interleaved((0, "stop"), (0, None)), True),
        # the last finish reason wins, as assembling the answer keeps it
        (_interleaved((0, "stop"), (0, "length")), False),
        (_interleaved((0, "length"), (0, "stop")), True),
        ([ChatChunk(usage=Usage())], False),
    ],
)
def test_storable_streams_read_each_choices_last_finish_reason(
    chunks: list[ChatChunk], storable: bool
) -> None:
    assert is_storable(chunks) is storable
    # the same verdict as for the assembled answer
    assert is_storable(response_from_chunks(chunks)) is storable


def test_foreign_bytes_do_not_decode() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_entry(b"not msgpack at all")
    with pytest.raises(msgspec.DecodeError):
        decode_entry(msgspec.msgpack.encode({"stored_at": 1.0}))


@pytest.mark.parametrize(
    "stored",
    [
        {"chunks": []},
        {"chunks": [{"choices": [], "usage": {"prompt_tokens": 1}}]},  # a usage chunk alone
        {"response": {"choices": []}},
    ],
)
def test_an_entry_without_a_choice_does_not_decode(stored: dict[str, Any]) -> None:
    """Never stored (no finish reason: not storable); replayed, it was a 200 without an answer."""
    with pytest.raises(msgspec.DecodeError, match="no choice"):
        decode_entry(msgspec.msgpack.encode(stored))
