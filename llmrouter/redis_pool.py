"""The Redis client that accounting and the cache connect with.

``redis.asyncio.Redis.from_url`` gives a pool that refuses a command at once, with
``MaxConnectionsError``, when all of its connections are in use (redis-py 8.2 bounds it
to 100): under more than ~100 concurrent requests a process's budget and limit checks
failed (503 ``accounting_unavailable``) and its cache lookups turned into misses, while
Redis itself was idle. This pool makes a command wait for a free connection instead, up to
``timeout``, which also bounds connecting and each command, so a Redis that stops
answering fails requests in seconds rather than holding them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["MAX_CONNECTIONS", "connect"]

MAX_CONNECTIONS = 100
"""Connections one process opens at most (redis-py's own default bound)."""


def connect(url: str, *, timeout: float, max_connections: int = MAX_CONNECTIONS) -> Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``) whose commands wait
    up to ``timeout`` seconds for one of ``max_connections`` connections, for connecting
    and for the reply; past that they raise ``redis.exceptions.ConnectionError`` or
    ``TimeoutError``. Closing the client closes its pool."""
    from redis.asyncio import BlockingConnectionPool, Redis

    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return Redis.from_pool(pool)
