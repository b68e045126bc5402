"""Server-sent events for streamed completions.

A stream is answered as ``data: <chunk JSON>\\n\\n`` events ending with
``data: [DONE]``. An error after the first event cannot change the status any more,
so it is sent as a final ``data: {"error": ...}`` event before ``[DONE]``.

When the client disconnects mid-stream, the body loop is cancelled (see
:mod:`llmrouter.server.disconnect`) and the chunk generator is closed at once, and with
it the router's and the provider's, which closes the upstream connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from litestar.response.streaming import ASGIStreamingResponse

from llmrouter.aio import on_asyncio
from llmrouter.errors import ShuttingDownError
from llmrouter.server.disconnect import (
    ClientDisconnected,
    DisconnectWatch,
    by_the_server,
    call_until_disconnect,
)
from llmrouter.server.errors import error_event
from llmrouter.server.responses import encoded, fill_response

if TYPE_CHECKING:
    from litestar.types import Receive, Send

__all__ = ["SSEResponse", "open_stream", "sse_events"]

DONE = b"data: [DONE]\n\n"
_STREAM_HEADERS = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))
_CONTENT_TYPE = (b"content-type", b"text/event-stream; charset=utf-8")
_encode = msgspec.json.Encoder().encode
# Closing the generator after a disconnect must not hang the worker on a stuck upstream.
_CLOSE_TIMEOUT_S = 5.0


async def sse_events(
    first: Any, rest: AsyncIterator[Any], request_id: str | None = None
) -> AsyncIterator[bytes]:
    """Encode ``first`` and then ``rest`` as SSE events, ending with ``[DONE]``."""
    finished = False
    try:
        if first is not None:
            yield b"data: " + _encode(first) + b"\n\n"
        async for chunk in rest:
            yield b"data: " + _encode(chunk) + b"\n\n"
        finished = True
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band
        finished = True
        yield error_event(exc, request_id)
    finally:
        if not finished:
            await _aclose(rest)
    yield DONE


async def _aclose(iterator: Any) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT_S):
        await aclose()


class SSEResponse(ASGIStreamingResponse):
    """A ``text/event-stream`` response that closes its chunks when the client leaves.

    Litestar's own loop cancels the iteration on a disconnect, but a generator parked at
    ``yield`` (waiting for ``send``) would stay open until garbage collection, and with
    it the upstream connection; this one closes it deterministically.

    On asyncio the chunks are encoded in the send loop itself: a generator of events
    between the chunks and the loop cost every chunk another generator step (~1.5k
    CPU instructions). Elsewhere, Litestar's loop sends :func:`sse_events`.
    """

    def __init__(
        self, first: Any, chunks: AsyncIterator[Any], request_id: str | None, headers: Mapping[str, str]
    ) -> None:
        fill_response(self, [*_STREAM_HEADERS, *encoded(headers), _CONTENT_TYPE])
        self.iterator = chunks  # replaced by their events when Litestar's loop sends them
        self._first = first
        self._chunks = chunks
        self._request_id = request_id

    async def send_body(self, send: Send, receive: Receive) -> None:
        finished = False
        try:
            if on_asyncio():
                try:
                    async with DisconnectWatch(receive):
                        await self._send_events(send)
                except ClientDisconnected:
                    return
                except asyncio.CancelledError:
                    # Not the client leaving (that is ClientDisconnected).
                    if not by_the_server():
                        raise  # an enclosing cancel scope's
                    # The server cut the stream at shutdown: tell the client why, and end
                    # the response as the server meant to (re-raised, the cancellation was
                    # ~40 lines of traceback in uvicorn's log per stream). The chunks are
                    # closed (and the request billed) below, as for any other end.
                    await _end_quietly(send, error_event(ShuttingDownError(), self._request_id))
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                    return
            else:
                self.iterator = sse_events(self._first, self._chunks, self._request_id)
                await super().send_body(send, receive)
            finished = True
        finally:
            if not finished:
                await _aclose(self.iterator)  # the events close the chunks

    async def _send_events(self, send: Send) -> None:
        """The events of :func:`sse_events`, each sent as it is encoded."""
        if self._first is not None:
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + _encode(self._first) + b"\n\n",
                    "more_body": True,
                }
            )
        next_chunk = self._chunks.__anext__
        while True:
            try:
                chunk = await next_chunk()
            except StopAsyncIteration:
                break
            except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band
                await send(
                    {
                        "type": "http.response.body",
                        "body": error_event(exc, self._request_id),
                        "more_body": True,
                    }
                )
                break
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + _encode(chunk) + b"\n\n",
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": DONE, "more_body": False})


async def _end_quietly(send: Send, event: bytes) -> None:
    """Send ``event`` and the end of the stream, if the connection still takes them."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
        try:
            await send({"type": "http.response.body", "body": event + DONE, "more_body": False})
        except Exception:  # noqa: BLE001 - the connection is closing anyway
            return


async def open_stream(
    receive: Receive, chunks: AsyncIterator[Any], headers: Callable[[], dict[str, str]], request_id: str
) -> SSEResponse:
    """Wait for the first chunk, then answer with the event stream.

    Waiting first means that a failure before any output (unknown model, upstream 429,
    no deployment) is still answered with its own HTTP status and headers, and that the
    routing headers (``headers()``, called after the first chunk) are known.
    """
    try:
        try:
            first = await call_until_disconnect(receive, chunks.__anext__)
        except StopAsyncIteration:
            first = None
        return SSEResponse(first, chunks, request_id, headers())
    except BaseException:
        await _aclose(chunks)  # the upstream stream and its deployment's slot, at once
        raise
