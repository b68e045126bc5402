"""JSON answers as Litestar ASGI responses, built without Litestar's header map.

``ASGIResponse.__init__`` adds ``content-type`` and ``content-length`` through its
case-insensitive ``MutableScopeHeaders`` (each a scan of the list and a ``KeyError``
caught when the name is absent, and a header given by name costs the same), and checks
status and body rules that a JSON answer always passes: 3.8 µs per answer. A
:class:`JSONResponse` (and the SSE response, :mod:`llmrouter.server.sse`) set the same
attributes to the same values, with the headers encoded in one list
(:func:`fill_response`): 0.4 µs (docs/benchmarks.md, item 46).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import msgspec
from litestar.datastructures.headers import MutableScopeHeaders
from litestar.response.base import ASGIResponse

__all__ = ["JSONResponse", "encoded", "fill_response", "json_response"]

_encode = msgspec.json.Encoder().encode
_CONTENT_TYPE = (b"content-type", b"application/json")


def fill_response(
    response: ASGIResponse, headers: list[tuple[bytes, bytes]], *, body: bytes = b"", status: int = 200
) -> None:
    """Fill every slot ``ASGIResponse.__init__`` fills, as it fills them for an answer
    with these (encoded, complete) ``headers``, ``body`` and ``status`` (one that allows
    a body). tests/server/test_responses.py compares the two."""
    response.headers = MutableScopeHeaders()
    response.headers.headers = headers
    response.background = None
    response.body = body
    response.content_length = len(body)
    response._encoded_cookies = ()
    response.encoding = "utf-8"
    response.is_head_response = False
    response.status_code = status


def encoded(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """``headers`` as an ASGI header list. A value that is not Latin-1 (a model group
    named in Chinese, say, in ``x-llmrouter-model-group``) goes percent-encoded as UTF-8:
    failing there, after the answer was made and billed, would turn it into a 500."""
    try:
        return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    except UnicodeEncodeError:
        return [(name.encode("latin-1"), _header_value(value)) for name, value in headers.items()]


def _header_value(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return quote(value, safe=_UNQUOTED).encode("ascii")


_UNQUOTED = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
"""Printable ASCII is kept as it is (``%`` aside, so that the encoding can be undone)."""


class JSONResponse(ASGIResponse):
    """An ``application/json`` answer: ``body`` (encoded), ``headers`` after the
    content type and length, ``status`` (one that allows a body)."""

    __slots__ = ()

    def __init__(self, body: bytes, headers: Mapping[str, str], status: int = 200) -> None:
        fill_response(
            self,
            [_CONTENT_TYPE, (b"content-length", str(len(body)).encode()), *encoded(headers)],
            body=body,
            status=status,
        )


def json_response(body: Any, headers: Mapping[str, str], status: int = 200) -> JSONResponse:
    """``body`` encoded by msgspec straight to bytes, with ``headers``."""
    return JSONResponse(_encode(body), headers, status)
