"""Server-sent events for streamed completions, and client-disconnect handling.

A stream is answered as ``data: <chunk JSON>\\n\\n`` events ending with
``data: [DONE]``. An error after the first event cannot change the status any more,
so it is sent as a final ``data: {"error": ...}`` event before ``[DONE]``.

When the HTTP client goes away the work it asked for is cancelled: Litestar's streaming
response cancels the body iteration on ``http.disconnect``, :class:`SSEResponse` then
closes the chunk generator (and through it the router's and provider's), and
:func:`call_until_disconnect` does the same for non-streamed calls by watching
``receive()`` while the router works.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import msgspec
from litestar.response.streaming import ASGIStreamingResponse

from llmrouter.server.errors import error_event

if TYPE_CHECKING:
    from litestar.types import Receive, Send

__all__ = ["ClientDisconnected", "SSEResponse", "call_until_disconnect", "open_stream", "sse_events"]

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode
# Closing the generator after a disconnect must not hang the worker on a stuck upstream.
_CLOSE_TIMEOUT_S = 5.0


class ClientDisconnected(Exception):
    """The HTTP client disconnected before the answer was ready."""


async def call_until_disconnect(receive: Receive, call: Callable[[], Awaitable[T]]) -> T:
    """Await ``call()``, cancelling it if the client disconnects meanwhile.

    The request body must already have been read: after it, the next ASGI message a
    server delivers is ``http.disconnect``.

    Raises:
        ClientDisconnected: the client went away; ``call()`` was cancelled.
    """
    result: list[T] = []
    error: list[Exception] = []

    async def watch_disconnect(scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return

    async with anyio.create_task_group() as group:
        group.start_soon(watch_disconnect, group.cancel_scope)
        try:
            result.append(await call())
        except Exception as exc:  # noqa: BLE001 - re-raised below, bare rather than in an ExceptionGroup
            error.append(exc)
        group.cancel_scope.cancel()
    if error:
        raise error[0]
    if not result:
        raise ClientDisconnected
    return result[0]


async def sse_events(
    first: Any, rest: AsyncIterator[Any], request_id: str | None = None
) -> AsyncIterator[bytes]:
    """Encode ``first`` and then ``rest`` as SSE events, ending with ``[DONE]``."""
    try:
        if first is not None:
            yield b"data: " + _encode(first) + b"\n\n"
        async for chunk in rest:
            yield b"data: " + _encode(chunk) + b"\n\n"
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band
        yield error_event(exc, request_id)
    finally:
        await _aclose(rest)
    yield DONE


async def _aclose(iterator: Any) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT_S):
        await aclose()


class SSEResponse(ASGIStreamingResponse):
    """A ``text/event-stream`` response that always closes its iterator.

    Litestar cancels the iteration when the client disconnects, but a generator parked
    at ``yield`` (waiting for ``send``) would otherwise stay open until garbage
    collection, and with it the upstream connection.
    """

    def __init__(self, iterator: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        super().__init__(
            iterator=iterator,
            headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers},
            media_type="text/event-stream",
            status_code=200,
        )

    async def send_body(self, send: Send, receive: Receive) -> None:
        try:
            await super().send_body(send, receive)
        finally:
            await _aclose(self.iterator)


async def open_stream(
    receive: Receive, chunks: AsyncIterator[Any], headers: Callable[[], dict[str, str]], request_id: str
) -> SSEResponse:
    """Wait for the first chunk, then answer with the event stream.

    Waiting first means that a failure before any output (unknown model, upstream 429,
    no deployment) is still answered with its own HTTP status and headers, and that the
    routing headers (``headers()``, called after the first chunk) are known.
    """
    try:
        first = await call_until_disconnect(receive, chunks.__anext__)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await _aclose(chunks)
        raise
    return SSEResponse(sse_events(first, chunks, request_id), headers())
