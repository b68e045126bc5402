"""Key changes pushed to every replica: through Redis pub/sub, or PostgreSQL's NOTIFY.

Each process trusts a key it verified for ``auth.cache_seconds`` (5 s) without reading
the database again, so a key revoked, changed or rotated on one replica stayed usable, or
kept its old limits and budget, on the others until then. The replica that changes a key
now publishes its prefix, and every replica drops that key from its cache as the message
arrives (milliseconds): on Redis when accounting has one, else on PostgreSQL
(``LISTEN``/``NOTIFY``). A message missed while a replica's subscription is down costs
nothing but the old bound: its cache still expires, and once following again it drops
every cached key. SQLite has no such channel: there the cache's bound is all there is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import msgspec

from llmrouter.accounting.config import AccountingConfig
from llmrouter.accounting.db import asyncpg_connection, create_engine, is_postgres
from llmrouter.aio import on_asyncio

__all__ = ["KeyEvents", "PostgresKeyEvents", "RedisKeyEvents", "key_events_for"]

log = logging.getLogger("llmrouter.accounting.keys")
_POLL_SECONDS = 1.0
_MAX_BACKOFF = 30.0
PG_CHANNEL = "llmrouter_keys_changed"

Forget = Callable[[str | None], None]
"""Drops a key's prefix from the cache (every key for None)."""


class KeyEvents:
    """Publishing and following key changes; the transports fill in :meth:`_send` and
    :meth:`_subscription`.

    Args:
        forget: called with a changed key's prefix, here and on every other replica; with
            None (every key) when following resumes after a failure, since changes
            published meanwhile were missed.
        follow: whether to follow changes (False: publish only).
    """

    def __init__(self, forget: Forget, *, follow: bool = True) -> None:
        self._forget = forget
        self._follows = follow
        self._task: asyncio.Task[None] | None = None

    async def publish(self, key_prefix: str) -> None:
        """Tell every replica that the key with ``key_prefix`` changed; a failure is
        logged (the change is committed; the others see it within ``cache_seconds``)."""
        try:
            await self._send(key_prefix)
        except Exception as exc:  # noqa: BLE001 - the change itself has been made
            log.warning(
                "keys: telling other replicas that key %s changed failed (%s: %s); they see it "
                "within auth.cache_seconds",
                key_prefix,
                type(exc).__name__,
                exc,
            )

    def start(self) -> None:
        """Follow changes in the background (asyncio; elsewhere caches just expire)."""
        if self._task is None and self._follows and on_asyncio():
            self._task = asyncio.get_running_loop().create_task(self._follow(), name="llmrouter-key-events")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _send(self, key_prefix: str) -> None:
        raise NotImplementedError

    def _subscription(self) -> AbstractAsyncContextManager[Callable[[], Any]]:
        """Subscribed on entry; yields what waits (up to a second) for the next message:
        a key prefix, or None. Raises when the connection is lost."""
        raise NotImplementedError

    async def _follow(self) -> None:
        backoff = 0.5
        while True:
            try:
                async with self._subscription() as next_message:
                    if backoff > 0.5:
                        self._forget(None)  # what was published meanwhile was missed
                        log.info("keys: following key changes again")
                    backoff = 0.5
                    while True:
                        prefix = await next_message()
                        if prefix is not None:
                            self._forget(prefix)
            except Exception as exc:  # noqa: BLE001 - the channel is down: retry, caches still expire
                if backoff == 0.5:
                    log.warning(
                        "keys: following key changes failed (%s: %s); retrying, and until then "
                        "other replicas' changes take up to auth.cache_seconds",
                        type(exc).__name__,
                        exc,
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)


class RedisKeyEvents(KeyEvents):
    """Key changes on the Redis channel ``<prefix>keys:changed``.

    Args:
        redis: a ``redis.asyncio.Redis`` to publish with.
        prefix: the deployment's Redis key prefix (``accounting.redis.prefix``).
        forget: see :class:`KeyEvents`.
        listener: a client of its own to follow the channel with (a subscription holds
            its connection for good, which must not take one of the pool that admits
            requests); closed with this. None: publish only.
    """

    def __init__(self, redis: Any, *, prefix: str, forget: Forget, listener: Any = None) -> None:
        super().__init__(forget, follow=listener is not None)
        self._redis = redis
        self._listener = listener
        self._channel = f"{prefix}keys:changed"

    async def _send(self, key_prefix: str) -> None:
        await self._redis.publish(self._channel, key_prefix)

    def _subscription(self) -> AbstractAsyncContextManager[Callable[[], Any]]:
        return _RedisSubscription(self._listener, self._channel)

    async def aclose(self) -> None:
        await super().aclose()
        if self._listener is not None:
            await self._listener.aclose()


class _RedisSubscription:
    def __init__(self, listener: Any, channel: str) -> None:
        self._pubsub = listener.pubsub()
        self._channel = channel

    async def __aenter__(self) -> Callable[[], Any]:
        await self._pubsub.subscribe(self._channel)
        return self._next

    async def _next(self) -> str | None:
        message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=_POLL_SECONDS)
        if message is None:
            return None
        data = message["data"]
        return data.decode() if isinstance(data, bytes) else str(data)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(_quietly(self._pubsub.aclose()))


class PostgresKeyEvents(KeyEvents):
    """Key changes as PostgreSQL notifications on ``llmrouter_keys_changed``.

    Args:
        engine: the accounting database's engine, to notify through.
        listener: an engine of its own to listen with (a listening connection is held for
            good, which must not take one of the pool that serves requests); disposed
            with this. None: publish only.
        forget: see :class:`KeyEvents`.
    """

    def __init__(self, engine: Any, *, listener: Any, forget: Forget) -> None:
        super().__init__(forget, follow=listener is not None)
        self._engine = engine
        self._listener = listener

    async def _send(self, key_prefix: str) -> None:
        async with asyncpg_connection(self._engine) as connection:
            await connection.execute("SELECT pg_notify($1, $2)", PG_CHANNEL, key_prefix)

    def _subscription(self) -> AbstractAsyncContextManager[Callable[[], Any]]:
        return _PostgresSubscription(self._listener)

    async def aclose(self) -> None:
        await super().aclose()
        if self._listener is not None:
            await self._listener.dispose()


class _PostgresSubscription:
    def __init__(self, listener: Any) -> None:
        self._listener = listener
        self._conn: Any = None
        self._raw: Any = None
        self._arrived: asyncio.Queue[str] = asyncio.Queue()

    async def __aenter__(self) -> Callable[[], Any]:
        self._conn = await self._listener.connect()
        try:
            self._raw = (await self._conn.get_raw_connection()).driver_connection
            await self._raw.add_listener(PG_CHANNEL, self._on_notification)
        except BaseException:  # cancelled (closing) or failed half-way: give it back
            await self.__aexit__()
            raise
        return self._next

    def _on_notification(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        self._arrived.put_nowait(payload)

    async def _next(self) -> str | None:
        try:
            return await asyncio.wait_for(self._arrived.get(), _POLL_SECONDS)
        except TimeoutError:
            if self._raw.is_closed():
                raise ConnectionError("the listening connection closed") from None
            return None

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await asyncio.shield(_quietly(self._conn.close()))


def key_events_for(
    engine: Any, redis: Any, *, config: AccountingConfig, forget: Forget, follow: bool
) -> KeyEvents | None:
    """How key changes reach the other replicas: Redis when accounting has a client,
    else PostgreSQL, else not at all (SQLite: their caches expire).

    Args:
        engine: the accounting database's engine.
        redis: accounting's ``redis.asyncio.Redis``, or None.
        config: accounting's config; a follower's connection of its own is made from it.
        forget: see :class:`KeyEvents`.
        follow: follow changes too (a replica), or only publish them (the CLI).
    """
    if redis is not None:
        settings = config.redis
        subscriber = None
        if follow and settings.url is not None:
            from llmrouter.redis_pool import connect

            subscriber = connect(settings.url, timeout=settings.timeout, max_connections=1)
        return RedisKeyEvents(redis, prefix=settings.prefix, forget=forget, listener=subscriber)
    if is_postgres(engine):
        listener = create_engine(msgspec.structs.replace(config.database, pool_size=1)) if follow else None
        return PostgresKeyEvents(engine, listener=listener, forget=forget)
    return None


async def _quietly(closing: Any) -> None:
    try:
        await closing
    except Exception:  # noqa: BLE001 - a broken connection is being dropped anyway
        pass
