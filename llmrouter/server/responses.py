"""JSON answers as Litestar ASGI responses, built without Litestar's header map.

``ASGIResponse.__init__`` adds ``content-type`` and ``content-length`` through its
case-insensitive ``MutableScopeHeaders`` (each a scan of the list and a ``KeyError``
caught when the name is absent, and a header given by name costs the same), and checks
status and body rules that a JSON answer always passes: 3.8 µs per answer. A
:class:`JSONResponse` sets the same attributes to the same values, with its headers
encoded in one list: 0.4 µs (docs/benchmarks.md, item 46).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from litestar.datastructures.headers import MutableScopeHeaders
from litestar.response.base import ASGIResponse

__all__ = ["JSONResponse", "json_response"]

_encode = msgspec.json.Encoder().encode
_CONTENT_TYPE = (b"content-type", b"application/json")


class JSONResponse(ASGIResponse):
    """An ``application/json`` answer: ``body`` (encoded), ``headers`` after the
    content type and length, ``status`` (one that allows a body)."""

    __slots__ = ()

    def __init__(self, body: bytes, headers: Mapping[str, str], status: int = 200) -> None:
        # Every slot ASGIResponse.__init__ fills, as it fills them for such an answer
        # (tests/server/test_responses.py compares the two).
        self.headers = MutableScopeHeaders()
        self.headers.headers = [
            _CONTENT_TYPE,
            (b"content-length", str(len(body)).encode()),
            *[(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()],
        ]
        self.background = None
        self.body = body
        self.content_length = len(body)
        self._encoded_cookies = ()
        self.encoding = "utf-8"
        self.is_head_response = False
        self.status_code = status


def json_response(body: Any, headers: Mapping[str, str], status: int = 200) -> JSONResponse:
    """``body`` encoded by msgspec straight to bytes, with ``headers``."""
    return JSONResponse(_encode(body), headers, status)
