"""``GET`` / ``DELETE /v1/admin/cache``: the cache's counters, and dropping every entry.

Imported only by the service (it needs Litestar). With API keys in use, both need a
key with the ``admin`` scope.

Each worker process of ``server.workers: N`` has its own :class:`ResponseCache`: the route
answers for the worker that takes the request. Its counters are that worker's; so is the
memory backend's content, which ``DELETE`` empties in that worker only. SQLite and Redis
entries are shared: ``DELETE`` drops them for every worker, and SQLite's ``entries`` and
``bytes`` are counted from the table when ``GET`` asks.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from litestar import Request, delete, get

from llmrouter.cache.breaker import PAUSE_SECONDS
from llmrouter.cache.layer import ResponseCache
from llmrouter.cache.sqlite import SQLiteBackend
from llmrouter.context import RequestContext
from llmrouter.errors import LLMRouterError, NotFoundError, PermissionDeniedError, one_line_cause
from llmrouter.server.state import Service, service_of

__all__ = ["ADMIN_PATH", "CacheUnavailableError", "cache_clear", "cache_handlers", "cache_stats"]

ADMIN_PATH = "/v1/admin/cache"

log = logging.getLogger("llmrouter.cache")

T = TypeVar("T")


class CacheUnavailableError(LLMRouterError):
    """The cache backend failed while an admin route used it (Redis down)."""

    status = 503
    type = "service_unavailable"
    default_code = "cache_unavailable"


def _require_admin(ctx: RequestContext) -> None:
    principal = ctx.principal
    if principal is None:
        return  # no API keys in use: a local, single-user service
    has_scope = getattr(principal, "has_scope", None)
    if has_scope is None or not has_scope("admin"):
        raise PermissionDeniedError("this endpoint needs an admin key", code="admin_required")


def _cache_of(service: Service) -> ResponseCache:
    cache = service.router.cache if service.router is not None else None
    if isinstance(cache, ResponseCache):
        return cache
    for ext in service.extensions:
        candidate = getattr(ext, "cache", None)
        if isinstance(candidate, ResponseCache):
            return candidate
    raise NotFoundError("the response cache is not enabled", code="cache_disabled")


async def _from_backend(cache: ResponseCache, work: Awaitable[T]) -> T:
    """``work``'s result; a failing backend is a 503 the admin may retry, counted in
    ``errors`` like the requests' failed lookups."""
    try:
        return await work
    except Exception as exc:
        cache.stats.errors += 1
        log.warning("cache: the admin route's backend call failed (%s)", one_line_cause(exc))
        raise CacheUnavailableError(
            f"the cache backend failed: {one_line_cause(exc)}", retry_after=PAUSE_SECONDS
        ) from exc


@get(ADMIN_PATH, summary="Response cache counters", tags=["admin"], operation_id="cache_stats")
async def cache_stats(request: Request[Any, Any, Any]) -> dict[str, Any]:
    service = service_of(request)
    _require_admin(await service.new_context(request))
    cache = _cache_of(service)
    if isinstance(cache.backend, SQLiteBackend):
        # Other workers store into the table too: its true totals, not this one's view.
        await _from_backend(cache, cache.backend.recount())
    return cache.snapshot()


@delete(
    ADMIN_PATH,
    summary="Drop every cached answer",
    tags=["admin"],
    operation_id="cache_clear",
    status_code=200,
)
async def cache_clear(request: Request[Any, Any, Any]) -> dict[str, Any]:
    service = service_of(request)
    _require_admin(await service.new_context(request))
    cache = _cache_of(service)
    return {"cleared": await _from_backend(cache, cache.clear())}


cache_handlers = [cache_stats, cache_clear]
