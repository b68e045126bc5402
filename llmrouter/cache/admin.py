"""``GET`` / ``DELETE /v1/admin/cache``: the cache's counters, and dropping every entry.

Imported only by the service (it needs Litestar). With API keys in use, both need a
key with the ``admin`` scope.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, delete, get

from llmrouter.cache.layer import ResponseCache
from llmrouter.context import RequestContext
from llmrouter.errors import NotFoundError, PermissionDeniedError
from llmrouter.server.state import Service, service_of

__all__ = ["ADMIN_PATH", "cache_clear", "cache_handlers", "cache_stats"]

ADMIN_PATH = "/v1/admin/cache"


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


@get(ADMIN_PATH, summary="Response cache counters", tags=["admin"], operation_id="cache_stats")
async def cache_stats(request: Request[Any, Any, Any]) -> dict[str, Any]:
    service = service_of(request)
    _require_admin(await service.new_context(request))
    return _cache_of(service).snapshot()


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
    return {"cleared": await _cache_of(service).clear()}


cache_handlers = [cache_stats, cache_clear]
