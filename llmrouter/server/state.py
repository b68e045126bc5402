"""The service's long-lived state, shared by every handler through the app's state."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from llmrouter.context import RequestContext
from llmrouter.errors import LLMRouterError
from llmrouter.extension import Extension
from llmrouter.ids import request_id_of
from llmrouter.server.drain import InFlight

if TYPE_CHECKING:
    from litestar import Request
    from litestar.connection import ASGIConnection

    from llmrouter.config import Config
    from llmrouter.router import Router

__all__ = [
    "CONTEXT_KEY",
    "STATE_KEY",
    "Service",
    "context_of",
    "header_dict",
    "response_headers",
    "service_of",
]

STATE_KEY = "llmrouter"
CONTEXT_KEY = "llmrouter.context"
"""Where :meth:`Service.new_context` keeps the request's context in the ASGI scope, for
the exception handlers to answer an error with the same headers as an answer."""

logger = logging.getLogger("llmrouter.server")


class Service:
    """What the handlers need: the router, the extensions and the config in force.

    A plain class on purpose: Litestar validates dependency values by type, and a
    dataclass would be introspected (and converted) on every request.
    """

    __slots__ = ("_authenticators", "config", "discovery_notes", "extensions", "in_flight", "router")

    def __init__(
        self, config: Config, router: Router | None = None, extensions: Sequence[Extension] = ()
    ) -> None:
        self.config = config
        self.router = router
        self.extensions = tuple(extensions)
        self.discovery_notes: list[str] = []
        self.in_flight = InFlight()
        # Only extensions that override authenticate() cost an await on the hot path.
        self._authenticators = tuple(
            ext for ext in self.extensions if type(ext).authenticate is not Extension.authenticate
        )

    @property
    def active_router(self) -> Router:
        if self.router is None:  # only before the lifespan started
            raise RuntimeError("the llmrouter service has not started")
        return self.router

    async def new_context(self, request: Request[Any, Any, Any]) -> RequestContext:
        """A request context from the HTTP request, authenticated by the extensions.

        Raises:
            AuthenticationError: an extension refused the credentials (reported to the
                router's hooks that count such refusals, see :meth:`_refused`).
        """
        headers = header_dict(request.scope["headers"])
        ctx = RequestContext(request_id=request_id_of(request.scope), traceparent=headers.get("traceparent"))
        request.scope[CONTEXT_KEY] = ctx  # type: ignore[literal-required]  # Litestar types the scope as a TypedDict
        if "cache-control" in headers:
            # Every line of it: a directive may come on a second ``Cache-Control`` line
            # (RFC 9110 joins repeated lines into one list), which header_dict drops.
            _read_cache_control(
                ctx,
                ",".join(
                    value.decode("latin-1")
                    for name, value in request.scope["headers"]
                    if name == b"cache-control"
                ).lower(),
            )
        elif headers.get("pragma", "").lower() == "no-cache":  # HTTP/1.0's, heeded without Cache-Control
            ctx.no_cache = True
        try:
            for ext in self._authenticators:
                await ext.authenticate(ctx, headers)
        except LLMRouterError as exc:
            self._refused(request.scope["path"], ctx, exc)
            raise
        return ctx

    def _refused(self, path: str, ctx: RequestContext, error: LLMRouterError) -> None:
        """Report a completion request the authentication refused (a missing or bad key)
        to the router's hooks that count refusals, as the router reports those it makes:
        it never reaches the router, yet it is a request refused (telemetry's
        ``unauthorized``).

        Only hooks with ``counts_unauthenticated`` are told: the others (accounting's
        writes a ledger row for each refusal) never heard of requests without a valid
        key, and an anonymous flood of 401s must not fill the ledger. Other routes
        (``/v1/models``, admin) are no completion requests, and are not reported."""
        router = self.router
        operation = _operation_of(path)
        if router is None or operation is None:
            return
        ctx.operation = operation
        ctx.status, ctx.error = "error", error
        for hook in router.hooks:
            if getattr(hook, "counts_unauthenticated", False):
                try:
                    hook.on_rejected(ctx, error)
                except Exception:
                    logger.exception("hook %r failed in on_rejected", hook)


def _operation_of(path: str) -> Literal["chat", "completion"] | None:
    """The router operation a request path asks for (with or without ``/v1``), if any."""
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "completion"
    return None


def header_dict(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """An ASGI scope's headers as a plain dict (names lowercased, as ASGI sends them; the
    first of repeated names wins). Built once per request: each lookup in Litestar's
    ``Headers`` scans the whole list again, and a request makes several."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(list(raw))}


def context_of(scope: Any) -> RequestContext | None:
    """The context :meth:`Service.new_context` made for the request of this ASGI scope, if any."""
    ctx: RequestContext | None = scope.get(CONTEXT_KEY)
    return ctx


def response_headers(ctx: RequestContext, *, with_cost: bool = True) -> dict[str, str]:
    """Headers that tell the client where its request went (and what it cost)."""
    headers: dict[str, str] = {}
    if ctx.deployment:
        headers["x-llmrouter-deployment"] = ctx.deployment
    if ctx.model_group:
        headers["x-llmrouter-model-group"] = ctx.model_group
    if ctx.cache_status:
        headers["x-llmrouter-cache"] = ctx.cache_status
    if with_cost and ctx.cost is not None:
        headers["x-llmrouter-cost"] = f"{ctx.cost:.8f}"
    if ctx.attempts > 1:
        headers["x-llmrouter-attempts"] = str(ctx.attempts)
    if ctx.extra_headers:
        headers.update(ctx.extra_headers)
    return headers


def service_of(request: ASGIConnection[Any, Any, Any, Any]) -> Service:
    """The :class:`Service` stored in the app's state.

    Handlers call this instead of declaring a Litestar dependency: resolving one builds a
    signature model and copies the app state into a new ``State`` on every request,
    about a tenth of the gateway's CPU per request.
    """
    service: Service = request.app.state[STATE_KEY]
    return service


_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)")


def _read_cache_control(ctx: RequestContext, directives: str) -> None:
    """``no-cache``, ``no-store`` and ``max-age=N`` of a request's ``Cache-Control``
    (lowercased); ``max-age=0`` asks for a fresh answer, as ``no-cache`` does."""
    ctx.no_cache = "no-cache" in directives
    ctx.no_store = "no-store" in directives
    found = _MAX_AGE.search(directives)
    if found is not None:
        ctx.max_age = float(found.group(1))
        ctx.no_cache = ctx.no_cache or ctx.max_age == 0
