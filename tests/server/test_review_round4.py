"""Retry-After rounded up; a Cache-Control directive on a second line; a refusal's content
stays null when a stream is assembled (review, 2026-12-05)."""

from __future__ import annotations

import anyio

from llmrouter.chunking import chunks_from_response, response_from_chunks
from llmrouter.config import parse_config
from llmrouter.errors import RateLimitError
from llmrouter.server.state import Service
from llmrouter.types import ChatChoice, ChatChunk, ChatMessage, ChatResponse, ChunkChoice, Delta


def test_retry_after_is_rounded_up_so_that_waiting_it_finds_room() -> None:
    # 119.3 s rounded to the nearest said 119, and a client waiting that long was refused again.
    assert RateLimitError("slow down", retry_after=119.3).headers() == {"Retry-After": "120"}
    assert RateLimitError("slow down", retry_after=0.2).headers() == {"Retry-After": "1"}
    assert RateLimitError("slow down", retry_after=3.0).headers() == {"Retry-After": "3"}


def test_a_refusal_assembled_from_a_stream_keeps_content_null() -> None:
    chunks = [
        ChatChunk(id="c", model="m", choices=[ChunkChoice(delta=Delta(role="assistant", refusal="I can't"))]),
        ChatChunk(id="c", model="m", choices=[ChunkChoice(delta=Delta(), finish_reason="stop")]),
    ]
    message = response_from_chunks(chunks).choices[0].message
    assert (message.content, message.refusal) == (None, "I can't")
    original = ChatResponse(
        id="c",
        model="m",
        choices=[ChatChoice(message=ChatMessage(role="assistant", refusal="I can't"), finish_reason="stop")],
    )
    assert (
        response_from_chunks(chunks_from_response(original)).choices[0].message == original.choices[0].message
    )


def test_a_cache_control_directive_on_a_second_line_counts() -> None:
    # RFC 9110 joins repeated lines into one list; the first line alone was read, so a
    # `no-store` on the second was ignored and the answer stored.
    class _Request:
        scope = {
            "headers": [
                (b"host", b"x"),
                (b"cache-control", b"max-age=0"),
                (b"cache-control", b"no-store, no-cache"),
            ],
            "state": {},
        }

    ctx = anyio.run(Service(parse_config({})).new_context, _Request())
    assert (ctx.no_cache, ctx.no_store) == (True, True)
