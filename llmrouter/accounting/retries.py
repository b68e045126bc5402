"""Settlements their store could not take, tried again until it can.

After its answer a request settles what it took: each budget window gets its
reservation back and its real cost added to spend, and each rate-limit ticket gives
back its concurrency slot and trues up its tokens. When the store is down or slow at
that moment (Redis restarting, a database failover), dropping the settlement would
leave the spend out of the window, which then lets more through than its limit, and
keep the reservation and the slot until their leases end (15 minutes by default,
refusing the key's requests meanwhile). Instead the settlement waits here and a
background task tries again, after 1 s and then backing off to 30 s, oldest first,
until the store takes it; the accounting's shutdown tries once more.

A settlement whose first try timed out may have reached the store all the same. Budget
windows are tried again ``again``: the store settles only a reservation it still
holds (its lease, in Redis and in the database), so the spend counts once whichever try
got through (a request that reserved nothing, being unpriced, has no lease to tell by).
A slot is released once however often it is tried; a token true-up tried again may
count twice in its one-minute window.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from llmrouter.aio import on_asyncio

__all__ = ["WAITING_LIMIT", "Retries"]

log = logging.getLogger("llmrouter.accounting")

Work = Callable[[], Awaitable[object]]

WAITING_LIMIT = 10_000
"""How many settlements may wait, by default."""


class Retries:
    """Settlements waiting for their store, at most ``limit`` (past it the oldest is
    dropped, and logged: a store down for that long has other problems).

    Args:
        limit: how many may wait.
        first_delay: seconds before the first retry; doubled after each failure.
        max_delay: the longest wait between retries.
    """

    def __init__(
        self, *, limit: int = WAITING_LIMIT, first_delay: float = 1.0, max_delay: float = 30.0
    ) -> None:
        self._waiting: deque[tuple[str, Work]] = deque()
        self.on_drained: Callable[[], None] = lambda: None
        """Called each time the last waiting settlement has gone through."""
        self._limit = limit
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, what: str, work: Work) -> None:
        """Call ``work`` again later (``what`` names it in the logs); starts the retries
        on asyncio (elsewhere, shutdown tries them)."""
        if len(self._waiting) >= self._limit:
            dropped, _ = self._waiting.popleft()
            log.error("accounting: %d settlements wait for their store; dropped %s", self._limit, dropped)
        self._waiting.append((what, work))
        if self._task is None and on_asyncio():
            self._task = asyncio.get_running_loop().create_task(self._retry(), name="llmrouter-settlements")

    async def _retry(self) -> None:
        delay = self._first_delay
        try:
            while self._waiting:
                await asyncio.sleep(delay)
                if await self.try_all():
                    log.info("accounting: the settlements that waited for their store are done")
                    return
                delay = min(delay * 2, self._max_delay)
        finally:
            self._task = None

    async def try_all(self) -> bool:
        """Run the waiting ones, oldest first, stopping at the first failure (the store
        is still down); True when none is left."""
        while self._waiting:
            entry = self._waiting[0]
            try:
                await entry[1]()
            except Exception as exc:  # noqa: BLE001 - still down: the next round tries again
                log.warning(
                    "accounting: %d settlements wait for their store (%s: %s: %s)",
                    len(self._waiting),
                    entry[0],
                    type(exc).__name__,
                    exc,
                )
                return False
            if self._waiting and self._waiting[0] is entry:
                self._waiting.popleft()
        self.on_drained()
        return True

    async def aclose(self) -> None:
        """Stop the retries and try once more; what is still waiting is logged and lost."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._waiting and not await self.try_all():
            log.error(
                "accounting: %d settlements never reached their store: budget windows miss "
                "that spend until they end (or Redis is re-seeded from the ledger), slots wait "
                "for their lease",
                len(self._waiting),
            )
