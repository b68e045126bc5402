"""Reading the body from the ASGI channel: the limits and failures of Litestar's ``Request.body()``."""

from __future__ import annotations

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
        self, messages: list[dict[str, Any]], *, limit: int | None = 100, length: bytes | None = None
    ):
        self.scope: dict[str, Any] = {"type": "http", "headers": [(b"host", b"x")], "state": {}}
        if length is not None:
            self.scope["headers"].append((b"content-length", length))
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
