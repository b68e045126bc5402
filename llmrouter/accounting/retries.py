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

Apart from the settlements wait the give-backs (:class:`GiveBacks`): what an admission
may have taken though its reply never came (a timeout, a cancellation), most often
nothing, so best effort, in a lane of their own; and what an admission that failed
half-way holds for certain (:meth:`Retries.give_back_held`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from llmrouter.aio import on_asyncio

__all__ = ["GIVE_BACKS_LIMIT", "WAITING_LIMIT", "GiveBacks", "Retries", "may_have_reached"]

log = logging.getLogger("llmrouter.accounting")

Work = Callable[[], Awaitable[object]]
E = TypeVar("E")

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
        self.give_backs = GiveBacks()
        """What admissions whose reply was lost may hold, given back apart, best effort."""

    def __len__(self) -> int:
        return len(self._waiting)

    def give_back_held(self, what: str, work: Work) -> None:
        """Give back in the background what an admission that failed or was cancelled
        holds for certain (a budget window it reserved, a slot, before a later step
        failed): the request's error goes on at once, not after a wait on a store that
        may have stopped answering. Among the give-backs (tried at once), or, when their
        lane is full, among the settlements: never dropped."""
        if self.give_backs.full:
            self.add(what, work)
        else:
            self.give_backs.add(work)

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
        failed = await _run_oldest_first(self._waiting, lambda entry: entry[1]())
        if failed is not None:
            (what, _), exc = failed
            log.warning(
                "accounting: %d settlements wait for their store (%s: %s: %s)",
                len(self._waiting),
                what,
                type(exc).__name__,
                exc,
            )
            return False
        self.on_drained()
        return True

    async def aclose(self) -> None:
        """Stop the retries and try once more; what is still waiting is logged and lost.
        Then the give-backs, after the settlements (which hold real spend)."""
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
        await self.give_backs.aclose()


async def _run_oldest_first(
    waiting: deque[E], run: Callable[[E], Awaitable[object]]
) -> tuple[E, Exception] | None:
    """Run ``waiting``'s entries, oldest first, each dropped once it went through (unless
    it was dropped meanwhile); stop at the first that fails (its store is still down) and
    return it with its error, left first in line. None when every one went through."""
    while waiting:
        entry = waiting[0]
        try:
            await run(entry)
        except Exception as exc:  # noqa: BLE001 - still down: the caller's next round tries again
            return entry, exc
        if waiting and waiting[0] is entry:
            waiting.popleft()
    return None


GIVE_BACKS_LIMIT = 1_000
"""How many give-backs may wait, by default."""


def may_have_reached(exc: BaseException) -> bool:
    """Whether the command that failed with ``exc`` may have reached its store: not when
    the store refused the connection, its name did not resolve, or no connection of the
    pool came free in time (nothing was sent); a timeout or a cancellation may have lost
    only the reply."""
    seen: BaseException | None = exc
    for _ in range(16):  # the chain of causes, as a traceback shows it (bounded: a cycle)
        if seen is None:
            return True
        if isinstance(seen, ConnectionRefusedError | socket.gaierror) or _found_no_connection(seen):
            return False
        seen = _cause(seen)
    return True


def _cause(exc: BaseException) -> BaseException | None:
    """The exception ``exc`` was raised from, or while handling, as a traceback shows it."""
    return exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _found_no_connection(exc: BaseException) -> bool:
    """Whether ``exc`` is redis-py's pool giving up its wait for a free connection
    (``BlockingConnectionPool.get_connection``): a ``ConnectionError`` raised from the
    wait's own ``TimeoutError``, before any command was sent. In an outage most refused
    admissions fail so, the pool's connections all held by commands that wait for their
    reply. A connection that timed out in the OS (ETIMEDOUT, after its command may have
    been sent) raises that ``ConnectionError`` too, but from a ``TimeoutError`` with an
    errno; a reply that timed out raises redis-py's own ``TimeoutError``."""
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
    except ImportError:  # no redis-py, so no Redis store
        return False
    cause = _cause(exc)
    return isinstance(exc, RedisConnectionError) and isinstance(cause, TimeoutError) and cause.errno is None


class GiveBacks:
    """Give-backs of what an admission may have taken though its reply never came (a
    Redis concurrency slot, a budget reservation), tried in the background, oldest first,
    at once (a client retrying after its 503 finds the slot free), then after 1 s backing
    off to 30 s, until the store takes them.

    Most free nothing (the store never ran the command), so no request waits for its own
    (awaited, it held the request's 503 for a second timeout of a store that stopped
    answering), none is logged on its own, and they wait apart from the settlements,
    which carry real spend: in an outage, the refused admissions' give-backs neither push
    those out of their queue nor hold up their retries. Past ``limit`` a new one is
    dropped, not one waiting: the oldest were sent as the store stopped answering, and
    are the likeliest to hold something (a long outage's later ones mostly hold
    nothing). The drops are logged in one line per round: what they may hold waits for
    its lease.

    Args:
        limit: how many may wait.
        first_delay: seconds before the first retry; doubled after each failure.
        max_delay: the longest wait between tries.
    """

    def __init__(
        self, *, limit: int = GIVE_BACKS_LIMIT, first_delay: float = 1.0, max_delay: float = 30.0
    ) -> None:
        self._waiting: deque[Work] = deque()
        self._limit = limit
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._dropped = 0  # since the last line that said so
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def full(self) -> bool:
        """Whether ``limit`` wait: :meth:`add` drops what it is given."""
        return len(self._waiting) >= self._limit

    def add(self, work: Work) -> None:
        """Call ``work`` in the background (on asyncio; elsewhere, shutdown tries it);
        dropped when :attr:`full`."""
        if self.full:
            self._dropped += 1
            return
        self._waiting.append(work)
        if self._task is None and on_asyncio():
            self._task = asyncio.get_running_loop().create_task(self._retry(), name="llmrouter-give-backs")

    async def _retry(self) -> None:
        delay = 0.0  # the first round as soon as the request that added it has gone on
        try:
            while self._waiting:
                await asyncio.sleep(delay)
                done = await self.try_all()
                self._log_dropped()
                if done:
                    return
                delay = min(max(delay * 2, self._first_delay), self._max_delay)
        finally:
            self._task = None

    async def try_all(self) -> bool:
        """Run the waiting ones, oldest first, stopping at the first failure (the store
        is still down); True when none is left."""
        failed = await _run_oldest_first(self._waiting, lambda work: work())
        if failed is not None:
            _, exc = failed
            log.debug(
                "accounting: %d give-backs wait for their store: %s: %s", len(self), type(exc).__name__, exc
            )
            return False
        return True

    def _log_dropped(self) -> None:
        if self._dropped:
            log.warning(
                "accounting: %d give-backs of admissions whose reply was lost were dropped (over %d "
                "waited): what they may hold waits for its lease",
                self._dropped,
                self._limit,
            )
            self._dropped = 0

    async def aclose(self) -> None:
        """Stop the tries and try once more; what is still waiting is logged, in one
        line, and left to its lease."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._log_dropped()
        if self._waiting and not await self.try_all():
            log.warning(
                "accounting: %d give-backs of admissions whose reply was lost never reached their "
                "store: what they may hold waits for its lease",
                len(self._waiting),
            )
