"""A blocking facade over :class:`~llmrouter.router.Router` for scripts and notebooks.

It runs the router on an event loop in a background thread (an anyio blocking portal),
so calls from plain synchronous code work, and iterating a stream pulls chunks across.
"""

from __future__ import annotations

import atexit
import inspect
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from contextlib import ExitStack
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from llmrouter.config import Config
from llmrouter.context import RequestContext
from llmrouter.router import Router
from llmrouter.types import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

__all__ = ["SyncRouter"]

T = TypeVar("T")
C = TypeVar("C")


class SyncRouter:
    """Synchronous twin of :class:`Router`; use as a context manager or call :meth:`close`.

    Args:
        config: a config (a router is made from it with ``router_kwargs``: ``hooks``,
            ``cache``), or a :class:`Router` to drive (then no keywords).

    A ``KeyboardInterrupt`` (Ctrl-C) while a call waits cancels the request, as cancelling
    the task would with :class:`Router` (the provider call is cancelled, the request is
    settled as ``cancelled``), then propagates. :meth:`close` ends the streams still open
    (their provider calls are cancelled) and may be called again; calls after it raise
    ``RuntimeError``. A router left open is closed when the interpreter exits.

    Example::

        with SyncRouter(load_config("llmrouter.yaml")) as router:
            print(router.chat({"model": "gpt", "messages": [{"role": "user", "content": "Hi"}]}))
    """

    def __init__(self, config: Config | Router | None = None, **router_kwargs: Any) -> None:
        from anyio.from_thread import start_blocking_portal  # ~15 ms: not for every import llmrouter

        if isinstance(config, Router) and router_kwargs:
            raise TypeError(
                f"SyncRouter got a Router and {', '.join(sorted(router_kwargs))}: pass those to the Router"
            )
        self._closed = False
        # The streams handed out, weakly: one left open holds a task that close() must end.
        self._streams: weakref.WeakSet[Generator[Any, None, None]] = weakref.WeakSet()
        self._stack = ExitStack()
        self._portal: BlockingPortal = self._stack.enter_context(start_blocking_portal())
        try:
            self.router = config if isinstance(config, Router) else Router(config, **router_kwargs)
            self._call(self.router.start)
        except BaseException:
            self._stop_loop()
            raise
        # Close a router the script never closed before the interpreter finalizes: by then
        # the loop thread can no longer run, and stopping it would hang the exit.
        atexit.register(self.close)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("SyncRouter is closed")

    def _call(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await func(*args)`` on the portal's loop; interrupted (Ctrl-C) while waiting,
        cancel that task and wait for it to unwind (a second interrupt stops the wait)."""
        self._check_open()
        done = threading.Event()

        async def run() -> T:
            try:
                return await func(*args)
            finally:
                done.set()

        future = self._portal.start_task_soon(run)
        try:
            return future.result()
        except BaseException:
            # The task's own exception (the future is done: cancel() is False), or one
            # raised in this thread while it waited: KeyboardInterrupt from a signal handler.
            if future.cancel():
                done.wait()
            raise

    def chat(
        self, request: ChatRequest | dict[str, Any], *, context: RequestContext | None = None
    ) -> ChatResponse:
        return self._call(partial(self.router.chat, request, context=context))

    def stream(
        self, request: ChatRequest | dict[str, Any], *, context: RequestContext | None = None
    ) -> Iterator[ChatChunk]:
        return self._stream(self.router.stream(request, context=context))

    def complete(
        self, request: CompletionRequest | dict[str, Any], *, context: RequestContext | None = None
    ) -> CompletionResponse:
        return self._call(partial(self.router.complete, request, context=context))

    def stream_complete(
        self, request: CompletionRequest | dict[str, Any], *, context: RequestContext | None = None
    ) -> Iterator[CompletionChunk]:
        return self._stream(self.router.stream_complete(request, context=context))

    def _stream(self, chunks: AsyncIterator[C]) -> Iterator[C]:
        stream = self._iterate(chunks)
        self._streams.add(stream)
        return stream

    def _iterate(self, chunks: AsyncIterator[C]) -> Generator[C, None, None]:
        self._check_open()
        with self._portal.wrap_async_context_manager(_AsyncIterContext(chunks)) as iterator:
            while True:
                try:
                    yield self._call(iterator.__anext__)
                except StopAsyncIteration:
                    return

    def list_models(self) -> ModelList:
        return self._call(self.router.list_models)

    def close(self) -> None:
        """End the open streams, close the router's providers and stop the loop thread
        (again: nothing)."""
        if self._closed:
            return
        atexit.unregister(self.close)
        with ExitStack() as closing:  # each step runs even if the one before it fails
            closing.callback(self._stop_loop)
            closing.callback(self._call, self.router.aclose)
            self._end_streams()

    def _end_streams(self) -> None:
        """Close the streams left open, which cancels their provider calls."""
        for stream in list(self._streams):
            # One not started yet raises "closed" when it is; one running in another
            # thread is cancelled with the loop's tasks.
            if inspect.getgeneratorstate(stream) == inspect.GEN_SUSPENDED:
                stream.close()

    def _stop_loop(self) -> None:
        """Stop the portal, cancelling the tasks still on it, so that its thread ends."""
        self._closed = True
        try:
            self._portal.call(self._portal.stop, True)
        finally:
            self._stack.close()

    def __enter__(self) -> SyncRouter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _AsyncIterContext:
    """Closes the async generator on the portal's loop when the sync iterator is dropped."""

    def __init__(self, iterator: Any) -> None:
        self._iterator = iterator

    async def __aenter__(self) -> Any:
        return self._iterator

    async def __aexit__(self, *exc_info: object) -> None:
        await self._iterator.aclose()
