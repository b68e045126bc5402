"""How optional subsystems (accounting, cache, telemetry) plug into the service.

An extension contributes router hooks, HTTP route handlers and lifecycle steps; the
one that owns API keys also authenticates requests. ``create_app`` collects the
extensions that the config enables and mounts them. Library users can ignore this
module and pass hooks to :class:`~llmrouter.router.Router` directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmrouter.context import RequestContext
    from llmrouter.hooks import CacheLayer, RouterHooks
    from llmrouter.router import Router

__all__ = ["Extension", "Gauge", "ResponseObserver"]

ResponseObserver = Callable[[MutableMapping[str, Any], int, float], None]
"""Called with a routed HTTP request's ASGI scope, its response status and the seconds
it took, once the response is sent (see :meth:`Extension.response_observers`)."""

Gauge = Callable[[], Iterable[tuple[Mapping[str, str], float]]]
"""An observable gauge's values now, as ``(attributes, value)`` pairs; read at every
metrics collection, so it must be quick and must not block."""


class Extension:
    """Base class; override what applies."""

    name: str = "extension"

    def router_hooks(self) -> Sequence[RouterHooks]:
        """Hooks to add to the router (in order)."""
        return ()

    def cache_layer(self) -> CacheLayer | None:
        """The cache layer to wrap dispatch with, if this extension provides one."""
        return None

    def attach(self, router: Router) -> None:
        """The router this extension's hooks and cache layer were added to, once it exists
        (in the app's lifespan, before the first request)."""

    def route_handlers(self) -> Sequence[Any]:
        """Litestar route handlers / controllers to mount."""
        return ()

    def middleware(self) -> Sequence[Any]:
        """ASGI middleware (Litestar ``DefineMiddleware`` or factories) to install."""
        return ()

    def response_observers(self) -> Sequence[ResponseObserver]:
        """What to call once each routed HTTP response is sent (status 500 when the app
        raised), with the scope, the status and the seconds since the request reached
        the service. For what needs no more than that (an HTTP metric) it is cheaper
        than a middleware: no ASGI layer of its own. An observer must not block; what
        it raises is logged."""
        return ()

    def gauges(self) -> Mapping[str, Gauge]:
        """Observable gauges this extension offers, by metric name (accounting: budgets'
        spend and limits), for the one that exports metrics (see :meth:`export_gauges`)."""
        return {}

    def export_gauges(self, gauges: Mapping[str, Gauge]) -> None:
        """Given every extension's :meth:`gauges` when the app is made; the telemetry
        extension exports those it declares."""

    async def startup(self) -> None:
        """Open connections, create tables, start background writers."""

    async def shutdown(self) -> None:
        """Flush and close; called once, even after a failed startup of a later extension."""

    async def authenticate(self, ctx: RequestContext, headers: Mapping[str, str]) -> None:
        """Fill ``ctx.api_key_id`` / ``ctx.principal`` from the request headers (a plain
        dict, names lowercased), or raise :class:`~llmrouter.errors.AuthenticationError`.
        Only the key owner overrides this."""

    def readiness(self) -> Mapping[str, Any]:
        """Extra entries for ``GET /ready`` (e.g. cache stats, ledger queue depth)."""
        return {}

    async def check(self) -> Mapping[str, Any]:
        """What ``GET /ready`` reports: :meth:`readiness`, and what an extension checks
        on the spot (accounting: do its database and Redis answer?). ``"ready": False``
        makes ``/ready`` answer 503."""
        return self.readiness()
