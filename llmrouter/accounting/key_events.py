"""Key changes pushed to every replica through Redis pub/sub.

Each process trusts a key it verified for ``auth.cache_seconds`` (5 s) without reading
the database again, so a key revoked, changed or rotated on one replica stayed usable, or
kept its old limits and budget, on the others until then. With Redis configured, the
replica that changes a key publishes its prefix, and every replica drops that key from
its cache as the message arrives (milliseconds). A message missed while a replica's
subscription is down costs nothing but the old bound: its cache still expires.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from llmrouter.aio import on_asyncio

__all__ = ["KeyEvents"]

log = logging.getLogger("llmrouter.accounting.keys")
_POLL_SECONDS = 1.0
_MAX_BACKOFF = 30.0


class KeyEvents:
    """Publishes and follows key changes on ``<prefix>keys:changed``.

    Args:
        redis: a ``redis.asyncio.Redis`` to publish with.
        prefix: the deployment's Redis key prefix (``accounting.redis.prefix``).
        forget: called with a changed key's prefix, here and on every other replica; with
            None (every key) when following resumes after a failure, since changes
            published meanwhile were missed.
        listener: a client of its own to follow the channel with (a subscription holds
            its connection for good, which must not take one of the pool that admits
            requests); closed with this. None: publish only.
    """

    def __init__(
        self, redis: Any, *, prefix: str, forget: Callable[[str | None], None], listener: Any = None
    ) -> None:
        self._redis = redis
        self._listener = listener
        self._channel = f"{prefix}keys:changed"
        self._forget = forget
        self._task: asyncio.Task[None] | None = None

    async def publish(self, key_prefix: str) -> None:
        """Tell every replica that the key with ``key_prefix`` changed; a failure is
        logged (the change is committed; the others see it within ``cache_seconds``)."""
        try:
            await self._redis.publish(self._channel, key_prefix)
        except Exception as exc:  # noqa: BLE001 - the change itself has been made
            log.warning(
                "keys: telling other replicas that key %s changed failed (%s: %s); they see it "
                "within auth.cache_seconds",
                key_prefix,
                type(exc).__name__,
                exc,
            )

    def start(self) -> None:
        """Follow the channel in the background (asyncio; elsewhere caches just expire)."""
        if self._task is None and self._listener is not None and on_asyncio():
            self._task = asyncio.get_running_loop().create_task(
                self._follow(self._listener), name="llmrouter-key-events"
            )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._listener is not None:
            await self._listener.aclose()

    async def _follow(self, listener: Any) -> None:
        backoff = 0.5
        while True:
            pubsub = listener.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                if backoff > 0.5:
                    self._forget(None)  # what was published meanwhile was missed
                    log.info("keys: following key changes again")
                backoff = 0.5
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_POLL_SECONDS)
                    if message is not None:
                        data = message["data"]
                        self._forget(data.decode() if isinstance(data, bytes) else str(data))
            except Exception as exc:  # noqa: BLE001 - Redis down: retry, caches still expire
                if backoff == 0.5:
                    log.warning(
                        "keys: following key changes failed (%s: %s); retrying, and until then "
                        "other replicas' changes take up to auth.cache_seconds",
                        type(exc).__name__,
                        exc,
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            finally:
                await asyncio.shield(_close(pubsub))


async def _close(pubsub: Any) -> None:
    try:
        await pubsub.aclose()
    except Exception:  # noqa: BLE001 - a broken connection is being dropped anyway
        pass
