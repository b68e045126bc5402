"""Exact-match response cache with in-flight coalescing.

::

    from llmrouter import Router
    from llmrouter.cache import MemoryBackend, ResponseCache

    router = Router(config, cache=ResponseCache(MemoryBackend(max_bytes=64 << 20), ttl=600))

Backends: :class:`MemoryBackend` (in-process LRU), ``llmrouter.cache.sqlite.SQLiteBackend``
(needs ``aiosqlite``) and ``llmrouter.cache.redis.RedisBackend`` (needs ``redis``); the
last two are imported only when used. See docs/cache.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmrouter.cache.config import CacheConfig
from llmrouter.lazy import lazy_exports

if TYPE_CHECKING:
    from llmrouter.cache.base import BackendStats, CacheBackend
    from llmrouter.cache.coalesce import Coalescer, Flight, FlightCancelledError
    from llmrouter.cache.entry import CacheEntry
    from llmrouter.cache.extension import CacheExtension
    from llmrouter.cache.key import cache_key, canonical_request
    from llmrouter.cache.layer import CacheStats, ResponseCache, build_backend
    from llmrouter.cache.memory import MemoryBackend
    from llmrouter.chunking import chunks_from_response, response_from_chunks
    from llmrouter.config import Config

__all__ = [
    "BackendStats",
    "CacheBackend",
    "CacheConfig",
    "CacheEntry",
    "CacheStats",
    "Coalescer",
    "Flight",
    "FlightCancelledError",
    "MemoryBackend",
    "ResponseCache",
    "build_backend",
    "cache_key",
    "canonical_request",
    "chunks_from_response",
    "extension_from_config",
    "response_from_chunks",
]

# Imported on first use: ``llmrouter.config`` imports ``llmrouter.cache.config``, and with
# it this package, on every ``import llmrouter``; the cache itself loads when used.
_LAZY = {
    "BackendStats": "llmrouter.cache.base",
    "CacheBackend": "llmrouter.cache.base",
    "CacheEntry": "llmrouter.cache.entry",
    "CacheStats": "llmrouter.cache.layer",
    "Coalescer": "llmrouter.cache.coalesce",
    "Flight": "llmrouter.cache.coalesce",
    "FlightCancelledError": "llmrouter.cache.coalesce",
    "MemoryBackend": "llmrouter.cache.memory",
    "ResponseCache": "llmrouter.cache.layer",
    "build_backend": "llmrouter.cache.layer",
    "cache_key": "llmrouter.cache.key",
    "canonical_request": "llmrouter.cache.key",
    "chunks_from_response": "llmrouter.chunking",
    "response_from_chunks": "llmrouter.chunking",
}


__getattr__ = lazy_exports(__name__, _LAZY)


def extension_from_config(config: Config) -> CacheExtension | None:
    """The service extension for ``config.cache`` (None when ``backend: none``); how
    ``create_app`` finds the cache."""
    from llmrouter.cache.extension import build_cache_extension

    return build_cache_extension(config)
