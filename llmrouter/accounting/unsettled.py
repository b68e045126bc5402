"""Budget settlements the store could not take, tried again until it can.

A request settles its budget windows after its answer: the reservation goes back and
the real cost is added to the window's spend. When the store is down or slow at that
moment (Redis restarting, a database failover), dropping the settlement would leave
the spend out of the window, which then lets more through than its limit, and keep the
reservation until its lease ends. Instead the settlement waits here and a background
task tries again, after 1 s and then backing off to 30 s, oldest first, until the
store takes it; the accounting's shutdown tries once more.

A settlement whose first try timed out may have reached the store all the same. Tries
after the first are made ``again``: the store settles only a reservation it still
holds (its lease, in Redis and in the database), so the spend counts once whichever try
got through. A request that reserved nothing (unpriced) has no lease to tell by; its
settlement, which adds what it cost (usually nothing), may then count twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

from llmrouter.aio import on_asyncio

if TYPE_CHECKING:
    from llmrouter.accounting.budgets import BudgetStore, BudgetWindow

__all__ = ["Settlement", "Unsettled"]

log = logging.getLogger("llmrouter.accounting")


class Settlement(NamedTuple):
    window: BudgetWindow
    reserved: int
    actual: int
    request_id: str


class Unsettled:
    """Settlements waiting for ``store``, at most ``limit`` (past it the oldest is dropped,
    and logged: a store down for that long has other problems).

    Args:
        store: where they go.
        limit: how many may wait.
        first_delay: seconds before the first retry; doubled after each failure.
        max_delay: the longest wait between retries.
    """

    def __init__(
        self, store: BudgetStore, *, limit: int = 10_000, first_delay: float = 1.0, max_delay: float = 30.0
    ) -> None:
        self._store = store
        self._waiting: deque[Settlement] = deque()
        self._limit = limit
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, settlement: Settlement) -> None:
        """Keep ``settlement`` for a later try (starts the retries on asyncio)."""
        if len(self._waiting) >= self._limit:
            dropped = self._waiting.popleft()
            log.error(
                "budget: %d settlements waiting for the store; dropped %s's on %s",
                self._limit,
                dropped.request_id,
                dropped.window.counter,
            )
        self._waiting.append(settlement)
        if self._task is None and on_asyncio():
            self._task = asyncio.get_running_loop().create_task(
                self._retry(), name="llmrouter-budget-settlements"
            )

    async def _retry(self) -> None:
        delay = self._first_delay
        try:
            while self._waiting:
                await asyncio.sleep(delay)
                if await self.try_all():
                    log.info("budget: the store took the settlements that had waited for it")
                    return
                delay = min(delay * 2, self._max_delay)
        finally:
            self._task = None

    async def try_all(self) -> bool:
        """Settle the waiting ones, oldest first, stopping at the first failure (the
        store is still down); True when none is left."""
        while self._waiting:
            settlement = self._waiting[0]
            try:
                await self._store.settle(*settlement, again=True)
            except Exception as exc:  # noqa: BLE001 - still down: the next round tries again
                log.warning(
                    "budget: %d settlements wait for the store: %s: %s",
                    len(self._waiting),
                    type(exc).__name__,
                    exc,
                )
                return False
            if self._waiting and self._waiting[0] is settlement:
                self._waiting.popleft()
        return True

    async def aclose(self) -> None:
        """Stop the retries and try once more; what is still waiting is logged and lost."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._waiting and not await self.try_all():
            log.error(
                "budget: %d settlements never reached the store; their windows miss that spend "
                "until they end (or Redis is re-seeded from the ledger)",
                len(self._waiting),
            )
