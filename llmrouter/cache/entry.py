"""What a cache entry holds.

A non-streamed answer is stored as its :class:`~llmrouter.types.ChatResponse`; a
streamed one as the exact list of chunks it arrived in, so that replaying it gives a
streaming client the same format (chunk boundaries, role chunk, final usage chunk).
Either shape can serve either kind of request: chunks are assembled into a response
for a non-streaming hit, and a response is re-chunked for a streaming hit
(:mod:`llmrouter.chunking`).
"""

from __future__ import annotations

import operator
import time
from itertools import chain

import msgspec

from llmrouter.chunking import chunks_from_response, response_from_chunks
from llmrouter.types import ChatChunk, ChatResponse, Usage

__all__ = ["CacheEntry", "decode_entry", "encode_entry", "is_storable", "last_usage"]

# Answers that ended for any of these reasons are not the answer to the request.
_INCOMPLETE_REASONS = frozenset({"cancelled", "canceled", "abort", "aborted", "error"})


class CacheEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One stored answer: exactly one of ``response`` / ``chunks`` is set."""

    response: ChatResponse | None = None
    chunks: list[ChatChunk] | None = None
    stored_at: float = 0.0
    """Unix seconds when it was stored (for ``Age``-style reporting and debugging)."""
    group: str | None = None
    """The fallback group that served the answer; None when the group the request named
    did (and in entries stored before this field). Only a caller that may use that
    fallback is served the entry."""

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


def encode_entry(
    *, response: ChatResponse | None = None, chunks: list[ChatChunk] | None = None, group: str | None = None
) -> bytes:
    """Encode an answer for storage (msgpack: compact and fast to decode); ``group``:
    the fallback group that served it, if one did (see :attr:`CacheEntry.group`)."""
    return _encoder.encode(CacheEntry(response=response, chunks=chunks, stored_at=time.time(), group=group))


def decode_entry(data: bytes) -> CacheEntry:
    """Decode a stored entry; raises ``msgspec.DecodeError`` for foreign or stale bytes,
    and for an entry without a choice (no answer: never stored, see :func:`is_storable`)."""
    entry = _decoder.decode(data)
    if (entry.response is None) == (entry.chunks is None):
        raise msgspec.DecodeError("cache entry holds neither or both answer shapes")
    if entry.response is not None:
        answered = bool(entry.response.choices)
    else:
        answered = any(chunk.choices for chunk in entry.chunks or ())  # the first chunk has one
    if not answered:
        raise msgspec.DecodeError("cache entry holds no choice")
    return entry


def is_storable(answer: ChatResponse | list[ChatChunk], *, store_truncated: bool = False) -> bool:
    """True when every choice finished normally (never errors, cancels or cut-offs).

    ``answer`` is a response, or the chunks of a streamed one: their finish reasons are
    read without assembling the answer (that costs ten times more).
    """
    refused = _REFUSED_UNLESS_TRUNCATED if store_truncated else _REFUSED
    if isinstance(answer, ChatResponse):
        # Read in place: a list of the reasons (a comprehension is one more call on 3.11)
        # cost every non-streamed miss ~2k CPU instructions more.
        choices = answer.choices
        if not choices:
            return False
        for choice in choices:
            if choice.finish_reason in refused:
                return False
        return True
    reasons = _last_finish_reasons(answer)
    return bool(reasons) and refused.isdisjoint(reasons)


# The finish reasons of an answer that is not stored: none (unfinished), incomplete,
# and cut off at the output limit unless ``store_truncated``.
_REFUSED_UNLESS_TRUNCATED = _INCOMPLETE_REASONS | {None}
_REFUSED = _REFUSED_UNLESS_TRUNCATED | {"length"}


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
