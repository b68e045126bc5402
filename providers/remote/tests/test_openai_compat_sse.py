"""Unit tests of the pieces of llmrouter.openai_compat that need no server."""

import email.utils
import time

import pytest

from llmrouter.errors import RateLimitError, UpstreamError
from llmrouter.openai_compat import (
    MAX_RETRY_AFTER,
    SSEDecoder,
    error_from_body,
    normalise_base_url,
    parse_retry_after,
)

STREAM = (
    b": comment\n\n"
    b'data: {"a":1}\n\n'
    b'event: error\r\ndata: {"error":{"message":"x"}}\r\n\r\n'
    b"data: first line\ndata: second line\n\n"
    b"id: 7\nretry: 100\ndata:no-space\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    (b"", b'{"a":1}'),
    (b"error", b'{"error":{"message":"x"}}'),
    (b"", b"first line\nsecond line"),
    (b"", b"no-space"),
    (b"", b"[DONE]"),
]


@pytest.mark.parametrize("step", [1, 2, 7, len(STREAM)])
def test_sse_decoder_is_independent_of_read_boundaries(step: int) -> None:
    decoder = SSEDecoder()
    events = []
    for start in range(0, len(STREAM), step):
        events += decoder.feed(STREAM[start : start + step])
    events += decoder.finish()
    assert events == EXPECTED


def test_sse_decoder_drops_a_byte_order_mark_opening_the_stream() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"\xef\xbb\xbfdata: {}\n\n") == [(b"", b"{}")]
    assert decoder.body() == b""


def test_sse_decoder_flushes_a_last_event_without_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: {}\n") == []
    assert decoder.finish() == [(b"", b"{}")]
    assert decoder.finish() == []


def test_sse_decoder_keeps_what_is_not_sse_only_before_the_first_event() -> None:
    answer = b'{\r\n  "id": "x",\n  "choices": []\n}'
    decoder = SSEDecoder()
    assert decoder.feed(answer[:9]) == [] and decoder.feed(answer[9:]) == [] and decoder.finish() == []
    assert decoder.body() == answer.replace(b"\r", b"")  # a JSON answer, for the caller to read
    decoder = SSEDecoder()
    assert decoder.feed(b": ping\nid: 1\nstray\ndata: {}\n\nmore stray\n") == [(b"", b"{}")]
    assert decoder.body() == b""  # once events come, nothing else is kept


def test_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert parse_retry_after({"retry-after": past}) == 0.0


def test_retry_after_is_finite_and_at_most_a_day() -> None:
    # "inf" parsed as a float, and its error then failed to write its own Retry-After
    # header (round(inf)): a 500 where the upstream's 429 belonged.
    for value in ("inf", "-inf", "nan", "1e400"):
        assert parse_retry_after({"retry-after": value}) is None
        assert parse_retry_after({"retry-after-ms": value, "retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "99999999999999999999"}) == MAX_RETRY_AFTER == 86400
    future = email.utils.formatdate(time.time() + 10 * 86400, usegmt=True)
    assert parse_retry_after({"retry-after": future}) == MAX_RETRY_AFTER
    error = error_from_body(429, b'{"error":{"message":"slow"}}', {"retry-after": "inf"}, provider="remote")
    assert error.http_status == 429 and error.headers() == {}


def test_error_from_body_keeps_the_upstream_fields() -> None:
    error = error_from_body(
        429,
        b'{"error":{"message":"quota","type":"rate_limit_error","code":"rate_limit_exceeded","param":null}}',
        {"retry-after": "4"},
        provider="remote",
    )
    assert isinstance(error, RateLimitError)
    assert (error.message, error.code, error.retry_after, error.provider, error.retryable) == (
        "quota",
        "rate_limit_exceeded",
        4.0,
        "remote",
        True,
    )
    server = error_from_body(500, b"oops", provider="remote")
    assert isinstance(server, UpstreamError) and server.message == "oops" and server.retryable


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://gpu-1:8000", "http://gpu-1:8000/v1"),
        ("http://gpu-1:8000/", "http://gpu-1:8000/v1"),
        ("http://gpu-1:8000/v1/", "http://gpu-1:8000/v1"),
        ("https://openrouter.ai/api/v1", "https://openrouter.ai/api/v1"),
    ],
)
def test_base_url_normalisation(given: str, expected: str) -> None:
    assert normalise_base_url(given) == expected
