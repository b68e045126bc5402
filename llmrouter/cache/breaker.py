"""Stop asking a cache backend that fails, for a while.

A cache backend that is down or stuck (Redis unreachable, a SQLite file on a full disk)
must not cost requests more than a miss. Its timeout bounds each call (2 s for Redis),
but a request makes two (the lookup and the store): against a Redis that stopped
answering, every request took 4 s longer, and every request logged two warnings. After a
failure the breaker skips the backend for :data:`PAUSE_SECONDS` (lookups are misses,
answers are not stored), then lets one call through to try it; the others keep skipping
until that one is answered. One warning when the backend is left alone, one line when it
answers again.

A failure about one entry (:func:`is_entry_error`) is no reason to leave the backend alone:
a bad entry under one key switched the cache off for every request each time that key was
asked for, and kept its answer from being stored over it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["PAUSE_SECONDS", "Breaker", "is_entry_error"]

log = logging.getLogger("llmrouter.cache")

PAUSE_SECONDS = 5.0


class Breaker:
    """Whether to call the backend now. Each call :meth:`allow` grants must end in
    :meth:`succeeded`, :meth:`failed` or :meth:`released` (cancelled).

    Args:
        pause: seconds the backend is left alone after a failure.
        clock: monotonic seconds.
    """

    __slots__ = ("_clock", "_pause", "_retry_at", "_trying")

    def __init__(self, pause: float = PAUSE_SECONDS, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._pause = pause
        self._clock = clock
        self._retry_at: float | None = None  # None: the backend is in use
        self._trying = False

    @property
    def paused(self) -> bool:
        return self._retry_at is not None

    def allow(self) -> bool:
        if self._retry_at is None:
            return True
        if self._trying or self._clock() < self._retry_at:
            return False
        self._trying = True  # this call tries the backend again
        return True

    def succeeded(self) -> None:
        if self._retry_at is not None:
            self._retry_at, self._trying = None, False
            log.info("cache: the backend answers again; using it")

    def failed(self, doing: str, exc: Exception) -> None:
        if self._retry_at is None:
            log.warning(
                "cache: %s failed (%s: %s); not using the backend for %g s",
                doing,
                type(exc).__name__,
                exc,
                self._pause,
            )
        self._retry_at, self._trying = self._clock() + self._pause, False

    def released(self) -> None:
        """A granted call ended without an answer (cancelled): another may try."""
        self._trying = False


def is_entry_error(exc: Exception) -> bool:
    """Whether ``exc`` is about the entry asked for rather than the backend: a value of a
    type the backend cannot read (``TypeError``, ``ValueError``). Anything else (refused
    connection, timeout, a locked or full database, a custom backend's own error) counts
    as the backend failing."""
    return isinstance(exc, TypeError | ValueError)
