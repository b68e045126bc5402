"""The storage contract that every cache backend implements, and its counters.

A backend stores opaque bytes under string keys with an optional TTL. It knows
nothing about chat requests: :mod:`llmrouter.cache.layer` decides what to store
and :mod:`llmrouter.cache.entry` how answers are encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["BackendStats", "CacheBackend"]


@dataclass(slots=True)
class BackendStats:
    """What a backend knows about its own contents.

    ``entries`` and ``bytes`` are None where the backend cannot tell cheaply (Redis,
    shared by many replicas and expiring keys on its own). ``bytes`` is what counts
    against the backend's ``max_bytes``.
    """

    entries: int | None = 0
    bytes: int | None = 0
    evictions: int = 0
    """Entries dropped to stay under the size bound."""
    expirations: int = 0
    """Entries found or swept past their TTL."""


@runtime_checkable
class CacheBackend(Protocol):
    """Bytes by key, with TTL. Every method may raise; the layer treats that as a miss.

    An entry the backend cannot read as bytes (a Redis key of another type, a SQLite row
    of the wrong types) is the backend's to drop: ``get`` deletes it and returns None,
    rather than raising, which would leave the whole backend alone for a while (see
    :mod:`llmrouter.cache.breaker`).
    """

    name: str

    async def start(self) -> None:
        """Open connections / create tables (idempotent)."""

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None when absent or expired."""

    async def set(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Store ``value`` for ``ttl`` seconds (None: until evicted); False when the
        backend declined it (larger than its whole size bound), so the layer counts it
        as skipped, not stored (None, from a backend written before this was asked, counts
        as stored)."""

    async def delete(self, key: str) -> None:
        """Forget ``key`` (no error when absent)."""

    async def clear(self) -> int:
        """Forget every entry of this cache; returns how many were dropped (if known)."""

    async def aclose(self) -> None:
        """Release connections; the backend may be started again."""

    def stats(self) -> BackendStats:
        """Current counters (cheap, synchronous)."""
