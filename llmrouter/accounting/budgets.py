"""Budgets: spend caps per key (optionally per model) and period, exact under concurrency.

Before dispatch the request's *maximum* cost (every prompt token at the input price plus
``max_tokens`` at the output price, ``ctx.max_cost``) is reserved against each budget
that applies; after the call the reservation is settled to the real cost. A reservation
succeeds only if ``spent + reserved + amount <= limit`` holds *atomically*, so however
many requests race, the sum of what they may cost never passes the limit: when every
request is priced (real cost <= reserved maximum), spend never exceeds the budget.

Money is counted in integer nano-dollars so that sums are exact: reservations round up,
settlements to the nearest unit.

Where the check-and-reserve is atomic depends on the store (``budget_backend``):

- :class:`MemoryBudgetStore` — one process: check and update run with no ``await``
  between them, so the event loop makes them atomic without a lock. Spend is seeded
  from the ledger the first time a window is used.
- :class:`~llmrouter.accounting.budget_stores.RedisBudgetStore` — replicas: one Lua
  script per reservation; reservations carry a lease so a crashed replica's are freed.
- :class:`~llmrouter.accounting.budget_stores.DatabaseBudgetStore` — replicas without
  Redis: ``UPDATE … WHERE spent + reserved + x <= limit`` (PostgreSQL row lock; the
  SQLite write lock), and a lease row per reservation, freed when a crashed replica's
  has expired.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Protocol

import anyio

from llmrouter.accounting import end_users
from llmrouter.accounting.config import BudgetRule
from llmrouter.accounting.retries import Retries, may_have_reached
from llmrouter.aio import on_asyncio
from llmrouter.errors import BudgetExceededError

if TYPE_CHECKING:
    from llmrouter.accounting.keys import ApiKey

__all__ = [
    "UNITS_PER_USD",
    "BudgetManager",
    "BudgetStore",
    "BudgetWindow",
    "MemoryBudgetStore",
    "Reservation",
    "fits",
    "period_bounds",
    "to_units",
]

log = logging.getLogger("llmrouter.accounting.budgets")
UNITS_PER_USD = 1_000_000_000
MAX_UNITS = 2**60
"""The most any amount or limit counts (~$1.15e9): ``spent + reserved + amount`` of three
such values still fits a signed 64-bit integer (PostgreSQL BIGINT, Redis)."""


def to_units(usd: float | None, *, round_up: bool = False) -> int:
    """USD as integer nano-dollars; ``round_up`` (with a tolerance for float noise) for
    reservations, so that a reservation is never below the cost it covers. Saturates at
    :data:`MAX_UNITS` (an absurd price times ``max_tokens`` must not overflow)."""
    if not usd or not usd > 0:  # also NaN
        return 0
    scaled = usd * UNITS_PER_USD
    if scaled >= MAX_UNITS:
        return MAX_UNITS
    return math.ceil(scaled - 1e-3) if round_up else round(scaled)


def fits(spent: int, reserved: int, amount: int, limit: int) -> bool:
    """Whether a reservation of ``amount`` keeps the window within ``limit``; a free
    request is refused once the budget is used up."""
    if amount == 0:
        return spent + reserved < limit
    return spent + reserved + amount <= limit


def period_bounds(period: str, now: float) -> tuple[str, float, float | None]:
    """``(tag, start, end)`` of the UTC window containing ``now``; ``end`` None for total."""
    moment = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("d%Y-%m-%d"), start.timestamp(), start.timestamp() + 86400
    if period == "month":
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
        return start.strftime("m%Y-%m"), start.timestamp(), nxt.timestamp()
    return "total", 0.0, None


@dataclass(frozen=True)
class BudgetWindow:
    """One budget in one period, for one key (and model)."""

    counter: str
    key_id: str | None
    model: str | None
    period: str
    start: float
    end: float | None
    limit: int
    soft_limit: int | None
    end_user: str | None = None
    """Only this end user's requests count (a ``user`` rule)."""


@dataclass
class Reservation:
    windows: list[tuple[BudgetWindow, int]] = field(default_factory=list)
    request_id: str = ""


SeedFn = Callable[[BudgetWindow], Awaitable[int]]


class BudgetStore(Protocol):
    """Atomic check-and-reserve over (spent, reserved) counters."""

    async def reserve(self, window: BudgetWindow, amount: int, request_id: str) -> tuple[bool, int, int]:
        """Reserve if it fits; returns ``(ok, spent, reserved)`` as seen by the check."""
        ...

    async def settle(
        self, window: BudgetWindow, reserved: int, actual: int, request_id: str, *, again: bool = False
    ) -> int:
        """Release ``reserved`` and add ``actual`` to spent; returns the new spent.

        ``again``: an earlier try failed and may have reached the store all the same (a
        timeout); a reservation that held something is then settled only if the store
        still holds it, so that the spend counts once.
        """
        ...

    async def usage(self, window: BudgetWindow) -> tuple[int, int]:
        """``(spent, reserved)`` now."""
        ...

    async def aclose(self) -> None: ...


ENDED_KEPT = 3600.0
"""Seconds a window's counter stays in a process after the window ends (for requests
that settle late); a database keeps its row a day (``llmr_budget_counters.ends_at``)."""


class EndedWindows:
    """The counters of windows that end, with their end, for their owner to drop once
    ended: without that, a process running for months kept every day's counter of every
    key and every end user.

    Args:
        clock: Unix seconds (tests move it).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._ends: dict[str, float] = {}
        self._clock = clock
        self._next_look = 0.0

    def add(self, window: BudgetWindow) -> list[str]:
        """Note ``window`` (new to the owner); returns the counters ended over
        :data:`ENDED_KEPT` ago, which it forgets (looked for at most once a minute)."""
        if window.end is not None:
            self._ends[window.counter] = window.end
        now = self._clock()
        if now < self._next_look:
            return []
        self._next_look = now + 60.0
        ended = [counter for counter, end in self._ends.items() if end + ENDED_KEPT < now]
        for counter in ended:
            del self._ends[counter]
        return ended


class MemoryBudgetStore:
    """Counters in this process; spend seeded from the ledger on first use of a window,
    dropped an hour after the window ends.

    Args:
        seed: returns a window's spend from the ledger.
        clock: Unix seconds, for dropping ended windows (tests move it).
    """

    def __init__(self, seed: SeedFn, *, clock: Callable[[], float] = time.time) -> None:
        self._seed = seed
        self._counters: dict[str, list[int]] = {}
        self._seeding: dict[str, anyio.Lock] = {}
        self._ended = EndedWindows(clock)

    async def _state(self, window: BudgetWindow) -> list[int]:
        state = self._counters.get(window.counter)
        if state is None:
            # One ledger query per window, however many requests arrive together.
            lock = self._seeding.setdefault(window.counter, anyio.Lock())
            async with lock:
                state = self._counters.get(window.counter)
                if state is None:
                    state = self._counters[window.counter] = [await self._seed(window), 0]
                    for counter in self._ended.add(window):
                        self._counters.pop(counter, None)
            self._seeding.pop(window.counter, None)
        return state

    async def reserve(self, window: BudgetWindow, amount: int, request_id: str) -> tuple[bool, int, int]:
        state = await self._state(window)
        # No await from here on: check and update are atomic on the event loop.
        spent, reserved = state
        if not fits(spent, reserved, amount, window.limit):
            return False, spent, reserved
        state[1] += amount
        return True, spent, state[1]

    async def settle(
        self, window: BudgetWindow, reserved: int, actual: int, request_id: str, *, again: bool = False
    ) -> int:
        state = await self._state(window)  # only the ledger's seeding can fail, before any change
        state[1] -= reserved
        state[0] += actual
        return state[0]

    async def usage(self, window: BudgetWindow) -> tuple[int, int]:
        spent, reserved = await self._state(window)
        return spent, reserved

    async def aclose(self) -> None:
        self._counters.clear()


class BudgetManager:
    """Finds the budgets that apply to a request and reserves/settles them.

    Args:
        rules: the configured budgets.
        store: where counters live.
    """

    def __init__(
        self, rules: Sequence[BudgetRule], store: BudgetStore, retries: Retries | None = None
    ) -> None:
        self.rules = list(rules)
        self.store = store
        self._own_retries = retries is None
        self.retries = retries if retries is not None else Retries()
        """Settlements the store could not take yet (:mod:`llmrouter.accounting.retries`)."""
        self._soft_warned: set[str] = set()
        self._seen: dict[str, tuple[BudgetWindow, int]] = {}  # key windows' spend, as last seen
        self._seen_ended = EndedWindows()

    def may_apply(self, key: ApiKey | None) -> bool:
        """False when no budget can apply to a request by ``key`` (no rules, no budget
        of its own): the request reserves nothing."""
        return bool(self.rules) or (key is not None and key.budget is not None)

    def windows_for(
        self,
        key: ApiKey | None,
        model_group: str | None,
        now: float | None = None,
        end_user: str | None = None,
    ) -> list[BudgetWindow]:
        """The budget windows a request by ``key`` for ``model_group`` (on behalf of
        ``end_user``, the request's ``user`` field) counts against."""
        now = time.time() if now is None else now
        key_id = key.id if key is not None else None
        user = end_users.as_stored(end_user)  # as the ledger keeps it, which seeds its windows
        found: dict[str, BudgetWindow] = {}
        candidates: list[tuple[str | None, str, float, float | None, str, str | None]] = []
        for rule in self.rules:
            if rule.key != "*" and (key is None or rule.key not in (key.id, key.name)):
                continue
            if rule.model is not None and rule.model != model_group:
                continue
            if rule.user is not None and (user is None or rule.user not in ("*", user)):
                continue
            per_user = user if rule.user is not None else None
            candidates.append((rule.model, rule.period, rule.limit, rule.soft_limit, "", per_user))
        if key is not None and key.budget is not None:
            # A budget set again, or given another period, counts afresh: its own counters.
            version = f"|v{key.budget_version}" if key.budget_version else ""
            candidates.append((None, key.budget_period or "month", key.budget, None, version, None))
        for model, period, limit, soft, version, per_user in candidates:
            tag, start, end = period_bounds(period, now)
            counter = f"{key_id or '-'}|{model or '*'}|{tag}{version}"
            if per_user is not None:
                counter += f"|{end_users.counter_tag(per_user)}"
            window = BudgetWindow(
                counter,
                key_id,
                model,
                period,
                start,
                end,
                to_units(limit),
                to_units(soft) if soft else None,
                per_user,
            )
            previous = found.get(counter)
            if previous is None or window.limit < previous.limit:
                found[counter] = window  # the same window twice: the stricter limit holds
        return list(found.values())

    async def reserve(
        self,
        key: ApiKey | None,
        model_group: str | None,
        max_cost: float | None,
        request_id: str,
        end_user: str | None = None,
        output_limit: int | None = None,
    ) -> Reservation:
        """Reserve ``max_cost`` against every budget of a request for ``model_group``, all
        or nothing. ``output_limit``: the request's (its ``max_tokens``, or
        ``router.default_max_tokens``), which a refusal names.

        Raises:
            BudgetExceededError: a budget cannot take it (429, ``insufficient_quota``).
        """
        reservation = Reservation(request_id=request_id)
        try:
            await self._reserve_all(
                reservation, self.windows_for(key, model_group, end_user=end_user), max_cost, output_limit
            )
        except BudgetExceededError:
            # Refused: the windows already reserved go back now, from a store that has
            # just answered (shielded: a cancelled request must not keep them). A store
            # that fails this gets it later (retries).
            with anyio.CancelScope(shield=True):
                await self.release(reservation)
            raise
        except BaseException:
            await self._give_back_held(reservation)  # failed (the store down or slow) or cancelled
            raise
        return reservation

    async def reserve_fallbacks(
        self,
        reservation: Reservation,
        key: ApiKey | None,
        fallbacks: Sequence[str],
        max_cost: float | None,
        end_user: str | None = None,
    ) -> tuple[str, ...]:
        """Add to ``reservation`` the per-model budgets of the fallback groups that may
        serve the request (their other budgets are the requested group's already); the
        groups whose budgets take it, which alone the request may fall back to. A
        fallback's budget that cannot take it passes that group over rather than refuse
        the request, which its own group may serve. :meth:`settle` charges the group that
        served. Should a store fail, or the request be cancelled, the whole reservation is
        given back (the requested group's too) before the error goes on."""
        usable = []
        for group in fallbacks:
            own = [
                window
                for window in self.windows_for(key, group, end_user=end_user)
                if window.model is not None
            ]
            taken = Reservation(request_id=reservation.request_id)
            try:
                await self._reserve_all(taken, own, max_cost)
            except BudgetExceededError:
                await self.release(taken)
                continue
            except BaseException:
                await self._give_back_held(taken)
                await self._give_back_held(reservation)
                raise
            reservation.windows += taken.windows
            usable.append(group)
        return tuple(usable)

    async def _reserve_all(
        self,
        reservation: Reservation,
        windows: list[BudgetWindow],
        max_cost: float | None,
        output_limit: int | None = None,
    ) -> None:
        """Reserve ``max_cost`` in each of ``windows`` into ``reservation``; raises at the
        first that cannot take it (those taken stay in ``reservation``)."""
        amount = to_units(max_cost, round_up=True)
        for window in windows:
            try:
                ok, spent, reserved = await self.store.reserve(window, amount, reservation.request_id)
            except BaseException as exc:
                # A store in memory changes nothing unless it replies.
                if amount and not isinstance(self.store, MemoryBudgetStore) and may_have_reached(exc):
                    self._give_back_lost(window, amount, reservation.request_id)
                raise
            self._saw(window, spent)
            if not ok:
                raise _exceeded(window, spent, reserved, amount, output_limit)
            reservation.windows.append((window, amount))

    async def _give_back_held(self, reservation: Reservation) -> None:
        """Give back the windows ``reservation`` holds, after a store failed or the request
        was cancelled half-way. A shared store's in the background
        (:meth:`~llmrouter.accounting.retries.Retries.give_back_held`): awaited, the
        request's 503 waited a second store timeout for each, the store having often
        stopped answering (a frozen Redis: 6 s with ``redis.timeout`` 2 s). A store in
        memory's at once (shielded: a cancelled request must not keep them)."""
        if isinstance(self.store, MemoryBudgetStore) or not on_asyncio():  # trio: no background
            with anyio.CancelScope(shield=True):
                await self.release(reservation)
            return
        windows, reservation.windows = reservation.windows, []
        for window, amount in windows:
            self.retries.give_back_held(
                f"releasing {reservation.request_id} on {window.counter}",
                partial(self.store.settle, window, amount, 0, reservation.request_id, again=True),
            )

    def _give_back_lost(self, window: BudgetWindow, amount: int, request_id: str) -> None:
        """Give back in the background the reservation in ``window`` that a shared store
        may hold though its reply never came (a timeout, a cancellation), by the request's
        id: settled "again", it changes nothing where the store does not hold it. Not
        awaited: the request's error goes on at once, not after a second wait on a store
        that stopped answering."""
        self.retries.give_backs.add(partial(self.store.settle, window, amount, 0, request_id, again=True))

    async def settle(self, reservation: Reservation, cost: float | None, model: str | None = None) -> bool:
        """Turn the reservation into the real cost; True if a soft limit is now crossed.
        ``model``: the group that served; another group's per-model window (a fallback's,
        reserved in case it served) is released at no cost (None: every window pays). A
        window the store cannot settle now is settled later (:attr:`retries`), and stays
        in ``reservation.windows`` meanwhile."""
        soft_crossed = False
        for window, spent in await self._settle(reservation, to_units(cost), model):
            self._saw(window, spent)
            charged = model is None or window.model is None or window.model == model
            if charged and window.soft_limit is not None and spent >= window.soft_limit:
                soft_crossed = True
                if window.counter not in self._soft_warned:
                    if len(self._soft_warned) >= 10_000:  # mostly ended windows: a warning may repeat
                        self._soft_warned.clear()
                    self._soft_warned.add(window.counter)
                    log.warning(
                        "budget: soft limit crossed for %s (spent $%.6f of soft $%.6f, hard $%.6f)",
                        window.counter,
                        spent / UNITS_PER_USD,
                        window.soft_limit / UNITS_PER_USD,
                        window.limit / UNITS_PER_USD,
                    )
        return soft_crossed

    def _saw(self, window: BudgetWindow, spent: int) -> None:
        if window.end_user is not None:  # an end user's window is not a metric (unbounded)
            return
        if window.counter not in self._seen:
            for counter in self._seen_ended.add(window):
                self._seen.pop(counter, None)
        self._seen[window.counter] = (window, spent)

    def gauges(self, now: float | None = None) -> list[tuple[dict[str, str], float, float]]:
        """Each key's budget window that this process has used and that has not ended:
        its attributes (key id, period, model), the spend it last saw (USD) and the limit.
        Safe to call from another thread (a metrics collection)."""
        now = time.time() if now is None else now
        found: dict[tuple[str, ...], tuple[dict[str, str], float, float]] = {}
        for window, spent in list(self._seen.values()):
            if window.end is not None and window.end <= now:
                continue
            attributes = {
                "llmrouter.api_key.id": window.key_id or "none",
                "llmrouter.budget.period": window.period,
                "gen_ai.request.model": window.model or "*",
            }
            limit = window.limit / UNITS_PER_USD
            same = found.get(tuple(attributes.values()))
            if same is None or limit < same[2]:  # a key's budget and a rule alike: the stricter
                found[tuple(attributes.values())] = (attributes, spent / UNITS_PER_USD, limit)
        return list(found.values())

    async def release(self, reservation: Reservation) -> None:
        """Give a reservation back unused (request rejected before dispatch)."""
        await self._settle(reservation, 0)

    async def settle_held(
        self, reservation: Reservation, cost: float | None, model: str | None = None
    ) -> None:
        """Settle the reservation of a request its process did not finish (the ledger's
        ``interrupted`` rows) to ``cost``, in each window whose store still holds it;
        one whose lease has ended was given back, and stays so. A store in memory holds
        no other process's reservations, and seeds its counters from the ledger, these
        rows included: nothing to do there."""
        if isinstance(self.store, MemoryBudgetStore):
            return
        await self._settle(reservation, to_units(cost), model, again=True)

    async def _settle(
        self, reservation: Reservation, cost: int, model: str | None = None, *, again: bool = False
    ) -> list[tuple[BudgetWindow, int]]:
        """Settle each window on its own to ``cost`` (0 in another group's per-model
        window than ``model``'s, when given); those the store fails are kept for later (and
        left in ``reservation.windows``: what still waits for the store). Returns the
        windows settled, with their spend after it."""
        windows, reservation.windows = reservation.windows, []
        settled = []
        for window, amount in windows:
            actual = cost if model is None or window.model is None or window.model == model else 0
            try:
                settled.append(
                    (
                        window,
                        await self.store.settle(window, amount, actual, reservation.request_id, again=again),
                    )
                )
            except Exception as exc:  # noqa: BLE001 - the store is down or slow: try again later
                log.warning(
                    "budget: settling %s on %s failed, to be tried again: %s: %s",
                    reservation.request_id,
                    window.counter,
                    type(exc).__name__,
                    exc,
                )
                self.retries.add(
                    f"settling {reservation.request_id} on {window.counter}",
                    partial(self.store.settle, window, amount, actual, reservation.request_id, again=True),
                )
                reservation.windows.append((window, amount))
        return settled

    async def aclose(self) -> None:
        """Try the waiting settlements once more (unless they were given), then close the store."""
        if self._own_retries:
            await self.retries.aclose()
        await self.store.aclose()

    def _rule_models(self) -> tuple[str | None, ...]:
        """Every model group a rule names, after None (the budgets of any model)."""
        return (None, *sorted({rule.model for rule in self.rules if rule.model is not None}))

    async def status(
        self,
        key: ApiKey | None,
        model_groups: Sequence[str | None] | None = None,
        end_user: str | None = None,
    ) -> list[dict[str, object]]:
        """Every budget window of ``key`` (and of its ``end_user``'s requests, with
        their per-user rules) with its spend, for ``/v1/usage``: those of
        ``model_groups``, or, None, of every model, the rules for one model included
        (a key's windows depend on the model its request names)."""
        seen: dict[str, dict[str, object]] = {}
        for model in self._rule_models() if model_groups is None else model_groups:
            for window in self.windows_for(key, model, end_user=end_user):
                if window.counter in seen:
                    continue
                spent, reserved = await self.store.usage(window)
                seen[window.counter] = {
                    "user": window.end_user,
                    "model": window.model,
                    "period": window.period,
                    "limit": window.limit / UNITS_PER_USD,
                    "soft_limit": window.soft_limit / UNITS_PER_USD if window.soft_limit else None,
                    "spent": spent / UNITS_PER_USD,
                    "reserved": reserved / UNITS_PER_USD,
                    "resets_at": window.end,
                }
        return list(seen.values())


def _exceeded(
    window: BudgetWindow, spent: int, reserved: int, amount: int, output_limit: int | None = None
) -> BudgetExceededError:
    scope = f" for model {window.model}" if window.model else ""
    if window.end_user is not None:
        scope += f" for end user {window.end_user[:100]!r}"
    limit = f"{window.period} limit ${window.limit / UNITS_PER_USD:.6f}"
    if amount > window.limit:
        # Not even an empty window takes it: a Retry-After at the reset would send the
        # client back then to be refused again. A client that sent no max_tokens is told
        # where the bound it is charged for comes from.
        now = f"{output_limit} for this request; " if output_limit else ""
        return BudgetExceededError(
            f"budget exceeded{scope}: this request may cost up to ${amount / UNITS_PER_USD:.6f}, "
            f"more than the {limit}: lower max_tokens ({now}a request without it is bounded by "
            "router.default_max_tokens) or send a shorter prompt",
            retry_after=None,
            retryable=False,
            until_reset=True,  # x-should-retry: false
        )
    # Would it fit with no reservation in the way? A free request (amount 0) does not once
    # spend reaches the limit (see fits): then too only the period's end makes room.
    until_reset = not fits(spent, 0, amount, window.limit)
    if until_reset:  # only the period's end makes room
        retry = max(1.0, window.end - time.time()) if window.end is not None else None
    else:  # other requests' reservations are in the way; they settle within seconds
        retry = 1.0
    return BudgetExceededError(
        f"budget exceeded{scope}: {limit}, "
        f"spent ${spent / UNITS_PER_USD:.6f}, reserved ${reserved / UNITS_PER_USD:.6f}, "
        f"this request may cost up to ${amount / UNITS_PER_USD:.6f}",
        retry_after=retry,
        retryable=False,
        until_reset=until_reset,
    )
