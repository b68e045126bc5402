"""Response cache configuration: a plain msgspec Struct, no backend imports.

Lives under ``cache:`` in the main config::

    cache:
      backend: redis                  # none | memory | sqlite | redis
      ttl: 3600                       # default seconds; a model group's cache.ttl wins
      redis_url: redis://127.0.0.1:6379/0
      redis_prefix: "llmrouter:cache:"

This module is imported by :mod:`llmrouter.config`, so it must stay free of Redis,
SQLite and Litestar imports.
"""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = ["CacheBackendName", "CacheConfig", "TtlSeconds"]

CacheBackendName = Literal["none", "memory", "sqlite", "redis"]

TtlSeconds = Annotated[float, Meta(gt=0, le=sys.float_info.max)]
"""How long an answer stays cached: above 0 (an entry that expires as it is stored is a
cache turned off without saying so; ``backend: none`` or ``enabled: false`` say it), and
finite (Redis's expiry in milliseconds overflowed on .inf; ``null`` is "until evicted").
A model group's ``cache.ttl`` takes the same bound."""


class CacheConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where and how long answers are cached (see docs/cache.md)."""

    backend: CacheBackendName = "memory"
    """``none`` turns the cache (and in-flight coalescing) off."""
    ttl: TtlSeconds | None = 3600.0
    """Default seconds an answer stays cached; None keeps it until evicted."""
    max_bytes: Annotated[int, Meta(ge=0)] = 128 * 1024 * 1024
    """Size bound of the memory and SQLite backends (encoded answers); least recently
    used entries are evicted past it. 0 means unbounded (memory: don't)."""
    max_entry_bytes: Annotated[int, Meta(ge=1)] | None = 4 * 1024 * 1024
    """Answers larger than this are not stored."""
    sqlite_path: str = "./llmrouter-cache.db"
    """SQLite file; may be the accounting database's file (the cache keeps its own table)."""
    sqlite_table: str = "llmrouter_cache"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "llmrouter:cache:"
    """Prepended to every key, so replicas (and other applications) can share one Redis."""
    namespace_by_key: bool = False
    """Give each API key its own cache (answers are never shared between keys)."""
    coalesce: bool = True
    """Identical requests that arrive while the first is running wait for its answer."""
    store_truncated: bool = False
    """Also store answers cut off by ``max_tokens`` (``finish_reason: length``)."""
