"""A blocking facade over :class:`~llmrouter.router.Router` for scripts and notebooks.

It runs the router on an event loop in a background thread (an anyio blocking portal),
so calls from plain synchronous code work, and iterating a stream pulls chunks across.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from llmrouter.config import Config
from llmrouter.context import RequestContext
from llmrouter.router import Router
from llmrouter.types import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

__all__ = ["SyncRouter"]


class SyncRouter:
    """Synchronous twin of :class:`Router`; use as a context manager or call :meth:`close`.

    Example::

        with SyncRouter(load_config("llmrouter.yaml")) as router:
            print(router.chat({"model": "gpt", "messages": [{"role": "user", "content": "Hi"}]}))
    """

    def __init__(self, config: Config | Router | None = None, **router_kwargs: Any) -> None:
        from anyio.from_thread import start_blocking_portal  # ~15 ms: not for every import llmrouter

        self._stack = ExitStack()
        self._portal: BlockingPortal = self._stack.enter_context(start_blocking_portal())
        self.router = config if isinstance(config, Router) else Router(config, **router_kwargs)
        self._portal.call(self.router.start)

    def chat(
        self, request: ChatRequest | dict[str, Any], *, context: RequestContext | None = None
    ) -> ChatResponse:
        return self._portal.call(lambda: self.router.chat(request, context=context))

    def stream(
        self, request: ChatRequest | dict[str, Any], *, context: RequestContext | None = None
    ) -> Iterator[ChatChunk]:
        with self._portal.wrap_async_context_manager(
            _AsyncIterContext(self.router.stream(request, context=context))
        ) as iterator:
            while True:
                try:
                    yield self._portal.call(iterator.__anext__)
                except StopAsyncIteration:
                    return

    def complete(
        self, request: CompletionRequest | dict[str, Any], *, context: RequestContext | None = None
    ) -> CompletionResponse:
        return self._portal.call(lambda: self.router.complete(request, context=context))

    def list_models(self) -> ModelList:
        return self._portal.call(self.router.list_models)

    def close(self) -> None:
        try:
            self._portal.call(self.router.aclose)
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
