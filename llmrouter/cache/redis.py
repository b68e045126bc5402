"""Redis cache backend (redis.asyncio): one cache shared by every replica.

Each entry is a plain string key ``<prefix><cache key>`` set with ``SET ... PX`` so
Redis expires it; size bounds and eviction are Redis's own (``maxmemory`` with an
LRU policy), which is why entries and bytes are not reported here.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from llmrouter.cache.base import BackendStats
from llmrouter.redis_pool import connect

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisBackend"]

log = logging.getLogger("llmrouter.cache")

_SCAN_BATCH = 500


class RedisBackend:
    """Bytes by key in Redis.

    Args:
        url: ``redis://[:password@]host:port/db`` (or ``rediss://``, ``unix://``).
        prefix: prepended to every key; ``clear`` deletes only keys under it.
        client: an existing ``redis.asyncio.Redis`` to use instead (not closed by
            :meth:`aclose`).
        timeout: seconds a command may wait for a free connection (of
            :data:`~llmrouter.redis_pool.MAX_CONNECTIONS`), to connect, and for the
            reply; a stuck Redis turns into misses, not into stuck requests.
    """

    name = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "llmrouter:cache:",
        client: Redis | None = None,
        timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.prefix = prefix
        self._client: Redis | None = client
        self._owns_client = client is None
        self._bytes_written = 0

    async def start(self) -> None:
        self._redis()

    async def get(self, key: str) -> bytes | None:
        name = self.prefix + key
        try:
            value: Any = await self._redis().get(name)
        except ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            # A hash or list under our key is no entry of ours: a miss, not a failing
            # Redis. Dropped, or each lookup of it would find it again.
            log.warning("cache: dropping %s, a Redis key of another type than a string", name)
            await self._redis().delete(name)
            return None
        return None if value is None else bytes(value)

    async def set(self, key: str, value: bytes, ttl: float | None) -> bool:
        if ttl is None:
            await self._redis().set(self.prefix + key, value)
        else:
            await self._redis().set(self.prefix + key, value, px=max(1, math.ceil(ttl * 1000)))
        self._bytes_written += len(value)
        return True  # Redis refuses an entry only by raising (a full maxmemory without eviction)

    async def delete(self, key: str) -> None:
        await self._redis().delete(self.prefix + key)

    async def clear(self) -> int:
        client = self._redis()
        dropped = 0
        batch: list[Any] = []
        async for name in client.scan_iter(match=_escape_glob(self.prefix) + "*", count=_SCAN_BATCH):
            batch.append(name)
            if len(batch) >= _SCAN_BATCH:
                dropped += await client.unlink(*batch)
                batch.clear()
        if batch:
            dropped += await client.unlink(*batch)
        return dropped

    async def aclose(self) -> None:
        if self._client is not None and self._owns_client:
            client, self._client = self._client, None
            await client.aclose()

    def stats(self) -> BackendStats:
        # Shared and self-expiring: counting would mean a SCAN per call.
        return BackendStats(entries=None, bytes=None)

    @property
    def bytes_written(self) -> int:
        """Encoded bytes this process has stored since start."""
        return self._bytes_written

    def _redis(self) -> Redis:
        if self._client is None:
            self._client = connect(self.url, timeout=self.timeout)
        return self._client


def _escape_glob(text: str) -> str:
    """Escape Redis MATCH glob characters so the prefix matches literally."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
