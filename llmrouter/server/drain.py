"""Requests in flight, so that shutdown closes nothing they still need.

uvicorn ends a graceful shutdown that ran out of time (``server.drain_seconds``) by
cancelling the requests left and starting the app's shutdown at once, while those
requests are still unwinding: billing them as cancelled and recording their ledger rows.
The ledger writer closed under them, and their rows were lost. The lifespan now waits
for :class:`InFlight` to reach zero (bounded) before it closes the extensions.
"""

from __future__ import annotations

import logging

import anyio

__all__ = ["InFlight"]

log = logging.getLogger("llmrouter.server")


class InFlight:
    """HTTP requests being handled (counted by the request-id middleware)."""

    __slots__ = ("_idle", "count")

    def __init__(self) -> None:
        self.count = 0
        self._idle: anyio.Event | None = None  # made only when shutdown waits

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, at_most_s: float) -> None:
        """Return once no request is in flight, or after ``at_most_s`` seconds (they are
        being cancelled by then, at the end of the drain or by a second Ctrl-C, and unwind
        in milliseconds; one stuck in something that ignores cancellation is left to the
        ledger, which records it as interrupted)."""
        if self.count == 0:
            return
        self._idle = anyio.Event()
        with anyio.move_on_after(at_most_s):
            await self._idle.wait()
        if self.count:
            log.warning("shutting down with %d requests still in flight", self.count)
