"""The cache as a service extension: the layer, its lifecycle, ``/ready`` stats and an
admin route.

``GET /v1/admin/cache`` returns the counters; ``DELETE /v1/admin/cache`` drops every
entry. Both need an admin key when API keys are in use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llmrouter.cache.layer import ResponseCache
from llmrouter.extension import Extension

if TYPE_CHECKING:
    from llmrouter.config import Config
    from llmrouter.hooks import CacheLayer

__all__ = ["CacheExtension", "build_cache_extension"]


class CacheExtension(Extension):
    """Mounts a :class:`ResponseCache` into the service.

    Args:
        cache: the cache layer (its backend is started and closed with the app).
    """

    name = "cache"

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    def cache_layer(self) -> CacheLayer:
        return self.cache

    async def startup(self) -> None:
        await self.cache.start()

    async def shutdown(self) -> None:
        await self.cache.aclose()

    def readiness(self) -> Mapping[str, Any]:
        # The cache never makes the service unready: a failing backend means misses.
        return self.cache.snapshot()

    def route_handlers(self) -> Sequence[Any]:
        # Imported here: Litestar is the service's dependency, not the library's.
        from llmrouter.cache.admin import cache_handlers

        return cache_handlers


def build_cache_extension(config: Config) -> CacheExtension | None:
    """The cache extension for ``config.cache`` (None when ``backend: none``)."""
    cache = ResponseCache.from_config(config)
    return None if cache is None else CacheExtension(cache)
