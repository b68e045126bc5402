"""Reading the body from the ASGI channel: the limits and failures of Litestar's ``Request.body()``."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import pytest
from litestar.exceptions import ClientException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.utils.scope.state import ScopeState

from llmrouter.server.body import read_body
from llmrouter.server.disconnect import ClientDisconnected

pytestmark = pytest.mark.anyio


class _Handler:
    def __init__(self, limit: int | None) -> None:
        self.limit = limit

    def resolve_request_max_body_size(self) -> int | None:
        return self.limit


class _Request:
    """What read_body uses of a Litestar request: its scope, receive and route handler."""

    def __init__(
        self,
        messages: list[dict[str, Any]],
        *,
        limit: int | None = 100,
        length: bytes | None = None,
        encoding: bytes | None = None,
    ):
        self.scope: dict[str, Any] = {"type": "http", "headers": [(b"host", b"x")], "state": {}}
        if length is not None:
            self.scope["headers"].append((b"content-length", length))
        if encoding is not None:
            self.scope["headers"].append((b"content-encoding", encoding))
        self.route_handler = _Handler(limit)
        self.received = 0
        self._messages = messages

    async def receive(self) -> dict[str, Any]:
        self.received += 1
        return self._messages.pop(0)


def _part(body: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_parts_are_joined_and_kept_where_litestar_looks_for_the_body() -> None:
    request = _Request([_part(b'{"a":', True), _part(b"", True), _part(b"1}")], length=b"6")
    assert await read_body(request) == b'{"a":1}'  # type: ignore[arg-type]
    assert ScopeState.from_scope(request.scope).body == b'{"a":1}'


async def test_an_announced_length_over_the_limit_is_refused_before_reading() -> None:
    request = _Request([_part(b"x" * 101)], length=b"101")
    with pytest.raises(RequestEntityTooLarge):
        await read_body(request)  # type: ignore[arg-type]
    assert request.received == 0


async def test_bytes_received_over_the_limit_are_refused_whatever_was_announced() -> None:
    request = _Request([_part(b"x" * 60, True), _part(b"x" * 60), _part(b"never read")], length=b"10")
    with pytest.raises(RequestEntityTooLarge):
        await read_body(request)  # type: ignore[arg-type]
    assert request.received == 2


async def test_no_limit_and_no_content_length() -> None:
    request = _Request([_part(b"x" * 10_000)], limit=None)
    assert len(await read_body(request)) == 10_000  # type: ignore[arg-type]


async def test_a_bad_content_length_and_a_client_gone_mid_body() -> None:
    with pytest.raises(ClientException, match="Invalid content-length"):
        await read_body(_Request([], length=b"ten"))  # type: ignore[arg-type]
    gone = _Request([_part(b"{", True), {"type": "http.disconnect"}])
    with pytest.raises(ClientDisconnected):  # not a 500: the service logs 499
        await read_body(gone)  # type: ignore[arg-type]


BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


async def _read(body: bytes, encoding: bytes | None, limit: int | None = 1000) -> bytes:
    return await read_body(_Request([_part(body)], limit=limit, encoding=encoding))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("encoded", "encoding"),
    [
        (gzip.compress(BODY), b"gzip"),
        (gzip.compress(BODY), b"X-GZIP"),
        (gzip.compress(BODY[:20]) + gzip.compress(BODY[20:]), b"gzip"),  # two members
        (zlib.compress(BODY), b"deflate"),
        (zlib.compress(BODY)[2:-4], b"deflate"),  # raw deflate, no zlib header
        (gzip.compress(zlib.compress(BODY)), b"deflate, gzip"),  # undone last first
        (gzip.compress(BODY), b"identity, gzip"),
        (b" " + BODY, b"identity"),
        (b" " + BODY, None),
    ],
    ids=[
        "gzip",
        "x-gzip",
        "two-members",
        "zlib",
        "raw-deflate",
        "two-codings",
        "identity-gzip",
        "identity",
        "none",
    ],
)
async def test_compressed_bodies_are_inflated(encoded: bytes, encoding: bytes | None) -> None:
    assert (await _read(encoded, encoding)).strip() == BODY


async def test_other_codings_are_415_naming_the_accepted_ones() -> None:
    with pytest.raises(ClientException) as refused:
        await _read(b"\x8b\x02\x80", b"br")
    assert refused.value.status_code == 415
    assert refused.value.headers == {"accept-encoding": "gzip, deflate"}
    assert "'br' is not supported" in refused.value.detail


@pytest.mark.parametrize(
    ("encoded", "encoding", "why"),
    [
        (gzip.compress(BODY)[:-3], b"gzip", "ends early"),
        (gzip.compress(BODY) + b"junk", b"gzip", "incorrect header check"),
        (zlib.compress(BODY) + b"x", b"deflate", "bytes follow its end"),
        (b"not gzip", b"gzip", "not valid gzip data"),
    ],
    ids=["cut", "trailing-junk", "zlib-then-more", "not-gzip"],
)
async def test_bodies_that_do_not_inflate_are_400(encoded: bytes, encoding: bytes, why: str) -> None:
    with pytest.raises(ClientException) as refused:
        await _read(encoded, encoding)
    assert refused.value.status_code == 400
    assert why in refused.value.detail


async def test_the_limit_applies_to_the_inflated_body() -> None:
    bomb = gzip.compress(b" " * 50_000_000)  # 49 kB that inflate to 50 MB
    assert len(bomb) < 100_000
    with pytest.raises(RequestEntityTooLarge):
        await _read(bomb, b"gzip", limit=100_000)
    exactly = gzip.compress(b" " * 999 + b"{")
    assert len(await _read(exactly, b"gzip", limit=1000)) == 1000
    with pytest.raises(RequestEntityTooLarge):  # one byte more, in a second member
        await _read(exactly + gzip.compress(b" "), b"gzip", limit=1000)
