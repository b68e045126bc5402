"""A request's body, read straight from the ASGI channel under the route's size limit.

Litestar's ``Request.body()`` reads the same bytes, but first builds its
case-insensitive header multidict to find ``Content-Length``, checks the header mapping
through ``typing``'s slow generic ``isinstance``, and streams through an async
generator. Read here, with the same checks, a request costs 37k fewer CPU
instructions, 7% of what the gateway spent on a JSON chat request (docs/benchmarks.md,
item 45). :func:`read_body` keeps its behaviour: a
``Content-Length`` over the limit is refused before anything is read, the bytes
received are counted against the limit as they arrive (``413``, see
:mod:`llmrouter.server.errors`). A client gone mid-body is not a server error (Litestar
raises a 500 there): it raises :class:`~llmrouter.server.disconnect.ClientDisconnected`,
which the service logs as 499 and answers with nothing.

A body sent with ``Content-Encoding: gzip`` or ``deflate`` (the zlib format, or raw
deflate as some clients send it) is inflated, and the limit applies to what it inflates
to as well, so a small compressed body cannot expand into gigabytes. Any other coding is
a ``415`` that lists the accepted ones in ``Accept-Encoding``; a body that does not
inflate is a ``400``. The header is looked at only for a body that does not start with
``{``: every route here takes a JSON object, and a compressed body never starts with one
(gzip's start with 0x1f, zlib's with 0x78), so plain requests pay nothing for it.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

from litestar import Request
from litestar.exceptions import ClientException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.utils.scope.state import ScopeState

from llmrouter.asgi import scope_header
from llmrouter.server.disconnect import ClientDisconnected

__all__ = ["ACCEPTED_ENCODINGS", "read_body"]

ACCEPTED_ENCODINGS = "gzip, deflate"
"""The content codings :func:`read_body` inflates (``identity`` aside)."""

_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}
"""zlib's ``wbits`` for each coding: a gzip member, or a zlib stream."""


async def read_body(request: Request[Any, Any, Any]) -> bytes:
    """The whole body of ``request`` (the route handler's ``request_max_body_size`` applies).

    Raises:
        RequestEntityTooLarge: announced or received bytes over the limit (413).
        ClientException: a ``Content-Length`` that is not a number (400).
        ClientDisconnected: the client disconnected before the body ended.
    """
    limit = request.route_handler.resolve_request_max_body_size() or math.inf
    length = scope_header(request.scope, b"content-length")
    if length is not None:
        try:
            announced = int(length)
        except ValueError:
            raise ClientException(f"Invalid content-length: {length.decode('latin-1')!r}") from None
        if announced > limit:
            raise RequestEntityTooLarge
    receive = request.receive
    parts: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            part = message.get("body", b"")
            if part:
                received += len(part)
                if received > limit:
                    raise RequestEntityTooLarge
                parts.append(part)
            if not message.get("more_body", False):
                break
        elif message["type"] == "http.disconnect":
            raise ClientDisconnected
    body = parts[0] if len(parts) == 1 else b"".join(parts)
    if body[:1] != b"{":
        body = _decoded(body, scope_header(request.scope, b"content-encoding"), limit)
    # Where Request.body() keeps it, should anything ask for the body again.
    ScopeState.from_scope(request.scope).body = body
    return body


def _decoded(body: bytes, encoding: bytes | None, limit: float) -> bytes:
    """``body`` with its content codings undone, the last applied first (RFC 9110, 8.4)."""
    if encoding is None:
        return body
    for coding in reversed(encoding.lower().split(b",")):
        coding = coding.strip()
        if coding in (b"", b"identity"):
            continue
        name = coding.decode("latin-1")
        if coding not in _WBITS:
            raise ClientException(
                f"Content-Encoding {name!r} is not supported: send the body as it is, or in {ACCEPTED_ENCODINGS}",
                status_code=415,
                headers={"accept-encoding": ACCEPTED_ENCODINGS},
            )
        wbits = _WBITS[coding]
        if coding == b"deflate" and not _zlib_header(body):
            wbits = -zlib.MAX_WBITS  # raw deflate, as some clients send "deflate"
        try:
            body = _inflate(body, wbits, limit)
        except zlib.error as exc:
            raise ClientException(f"the body is not valid {name} data: {exc}") from None
    return body


def _zlib_header(data: bytes) -> bool:
    """Whether ``data`` starts with a zlib header (RFC 1950: method 8, a multiple of 31)."""
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def _inflate(data: bytes, wbits: int, limit: float) -> bytes:
    """``data`` inflated, never to more than ``limit`` bytes (413 past it).

    Raises:
        zlib.error: ``data`` is not such a stream, ends early or has bytes after its end.
    """
    bound = 0 if limit == math.inf else int(limit) + 1  # zlib's max_length (0: none)
    parts: list[bytes] = []
    size = 0
    while data:  # a gzip body may hold several members, one after the other
        inflater = zlib.decompressobj(wbits)
        part = inflater.decompress(data, bound and bound - size)  # bound - size >= 1 here
        size += len(part)
        if size > limit:
            raise RequestEntityTooLarge
        if not inflater.eof:
            raise zlib.error("it ends early")
        parts.append(part)
        data = inflater.unused_data
        if data and wbits != _WBITS[b"gzip"]:
            raise zlib.error("bytes follow its end")
    return b"".join(parts)
