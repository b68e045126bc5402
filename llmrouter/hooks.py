"""Extension points on the request path: hooks that observe or admit requests,
and the cache layer that wraps dispatch.

The router calls, for each request::

    hook.before_request(ctx)        # in order; may raise (limits, budget) -> request rejected
    ... cache layer -> select -> provider, with on_attempt / on_fallback / on_cooldown /
        on_first_token events ...
    hook.after_request(ctx)         # exactly once for every hook whose before_request returned,
                                    # in reverse order, to the end even when the caller is
                                    # cancelled, also on error, cancel or rejection by a later hook
    hook.on_rejected(ctx, error)    # on every hook, when the request was refused before
                                    # dispatch (unknown model, auth, rate limit, budget)

``after_request`` must not raise; the router logs and swallows what it does raise.
Event methods are synchronous and cheap: they run on the hot path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from llmrouter.config import GroupCache
    from llmrouter.context import RequestContext
    from llmrouter.errors import LLMRouterError
    from llmrouter.types import ChatChunk, ChatRequest, ChatResponse

__all__ = ["CacheLayer", "RouterHooks"]


class RouterHooks:
    """Base class for request hooks; every method is a no-op by default."""

    settles_inline: bool = False
    """True when ``after_request`` never waits (no I/O, no lock another request may
    hold), so no cancellation can reach it. When every hook of a request says so, the
    router runs them in the caller's task; otherwise in a task of their own that the
    caller's cancellation does not reach (``llmrouter.aio.to_completion``), which costs a
    task per request."""

    async def before_request(self, ctx: RequestContext) -> None:
        """Admit the request (``ctx.request``, ``ctx.model_group``, ``ctx.max_cost`` are set)."""

    async def after_request(self, ctx: RequestContext) -> None:
        """Settle and record: ``ctx.status``, ``usage``, ``cost``, timings are set."""

    def on_attempt(self, ctx: RequestContext, deployment: str, error: LLMRouterError | None) -> None:
        """One attempt on one deployment ended: ``error`` is None on success, and an
        :class:`~llmrouter.dispatch.AttemptCancelledError` (never raised) when the caller
        left or the request was cancelled before the attempt's answer was complete."""

    def on_fallback(self, ctx: RequestContext, from_group: str, to_group: str) -> None:
        """The request moved on to a fallback model group."""

    def on_cooldown(self, deployment: str, seconds: float) -> None:
        """A deployment was taken out of rotation for ``seconds``."""

    def on_first_token(self, ctx: RequestContext) -> None:
        """The first content arrived (streams and non-streams alike)."""

    def on_chunk(self, ctx: RequestContext) -> None:
        """A stream chunk carrying content was delivered (streams only; the first one too)."""

    def on_rejected(self, ctx: RequestContext, error: LLMRouterError) -> None:
        """The request was refused before dispatch: a ``before_request`` raised ``error``
        (or the model is unknown).

        Called on every hook, so that rejections (rate limits, budgets) can be counted.
        A hook whose own ``before_request`` had already returned also gets
        ``after_request`` (with ``ctx.status == "error"`` and ``ctx.error`` set), so that
        whatever it acquired (a reservation, an in-flight count) is released.
        """


class CacheLayer(Protocol):
    """Wraps dispatch with lookup, in-flight coalescing and store (see ``llmrouter.cache``).

    ``call`` performs the real dispatch; the layer decides whether to call it, and sets
    ``ctx.cache_status``. The router tells it each group's settings (``ModelGroup.cache``)
    through ``configure_group``, also for groups added after the layer was attached.
    """

    def configure_group(self, name: str, settings: GroupCache | None) -> None: ...

    async def chat(
        self,
        ctx: RequestContext,
        request: ChatRequest,
        call: Callable[[], Awaitable[ChatResponse]],
    ) -> ChatResponse: ...

    def stream(
        self,
        ctx: RequestContext,
        request: ChatRequest,
        call: Callable[[], AsyncIterator[ChatChunk]],
    ) -> AsyncIterator[ChatChunk]: ...
