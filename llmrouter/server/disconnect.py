"""Cancel the work a client asked for when the client goes away.

After the request body is read, the next ASGI message a server delivers is
``http.disconnect`` (when the connection closes, or after the response). A watcher
waits for it while the router works and cancels the handler's task; the cancellation
runs down through the router into the provider, which closes its upstream connection.

On asyncio (uvicorn, hypercorn's asyncio worker) the watcher is a bare task that
cancels the handler task: about a fifth of the CPU an anyio task group costs per
request on this hot path. Other event loops get the task-group version.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import anyio

from llmrouter.aio import on_asyncio
from llmrouter.errors import ShuttingDownError

if TYPE_CHECKING:
    from litestar.types import Receive

__all__ = [
    "ClientDisconnected",
    "DisconnectWatch",
    "by_the_server",
    "call_until_disconnect",
    "shutting_down",
]

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client disconnected before the answer was complete."""


class DisconnectWatch:
    """``async with DisconnectWatch(receive):`` — on a disconnect the body is cancelled
    and :class:`ClientDisconnected` is raised instead (asyncio only)."""

    __slots__ = ("_receive", "_task", "_watcher", "disconnected")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.disconnected = False

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                if self._task is not None:
                    self._task.cancel()
                return

    async def __aenter__(self) -> DisconnectWatch:
        self._task = asyncio.current_task()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        # Both tasks are let go of: the cancelled watcher keeps its CancelledError, whose
        # traceback holds the watcher's frame and so this object; a reference back from
        # here would make a cycle, left for the garbage collector, on every request.
        watcher, self._watcher = self._watcher, None
        task, self._task = self._task, None
        if watcher is not None:
            watcher.cancel()
        if self.disconnected and task is not None:
            # Our own cancellation: take it back so that enclosing scopes don't see a
            # pending cancel, and say what happened instead.
            task.uncancel()
            if exc_type is None or issubclass(exc_type, asyncio.CancelledError):
                raise ClientDisconnected
        return False


def by_the_server() -> bool:
    """While a ``CancelledError`` is handled: True when the task itself was cancelled
    (what uvicorn does to the requests left when its graceful shutdown runs out of time),
    False when an enclosing anyio cancel scope was (its deadline reads minus infinity)."""
    return anyio.current_effective_deadline() != -math.inf


def shutting_down() -> ShuttingDownError:
    """While the server's cancellation of the request's task is handled (see
    :func:`by_the_server`): take the cancellation back and return the 503 to raise in
    its place. The client gets a 503 it can retry, not the server's plain-text 500."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return ShuttingDownError()


async def call_until_disconnect(receive: Receive, call: Callable[[], Awaitable[T]]) -> T:
    """Await ``call()``, cancelling it if the client disconnects meanwhile.

    Raises:
        ClientDisconnected: the client went away; ``call()`` was cancelled.
        ShuttingDownError: (asyncio) the server cancelled the request's task at the end
            of its shutdown's drain; ``call()`` was cancelled.
    """
    if on_asyncio():
        async with DisconnectWatch(receive) as watch:
            try:
                return await call()
            except asyncio.CancelledError:
                if watch.disconnected or not by_the_server():
                    raise  # the client left, or an enclosing cancel scope was cancelled
                # The task itself was cancelled: uvicorn's graceful shutdown ran out of
                # time. The router has billed the request as cancelled.
                raise shutting_down() from None
    return await _call_in_task_group(receive, call)


async def _call_in_task_group(receive: Receive, call: Callable[[], Awaitable[T]]) -> T:
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
