"""Settlements their store fails (down or slow) are kept and tried again until it takes
them: a budget window's spend is not lost and its reservation goes back, a rate-limit
slot is released."""

from __future__ import annotations

import logging
from functools import partial

import anyio
import pytest

from llmrouter.accounting.budgets import BudgetManager, MemoryBudgetStore
from llmrouter.accounting.config import BudgetRule, LimitsConfig
from llmrouter.accounting.hooks import AccountingHooks
from llmrouter.accounting.limits import MemoryLimiter
from llmrouter.accounting.retries import GiveBacks, Retries
from llmrouter.context import RequestContext
from llmrouter.errors import RateLimitError

pytestmark = pytest.mark.anyio


async def _nothing_spent(_: object) -> int:
    return 0


class Flaky(MemoryBudgetStore):
    """Settles fail while ``down`` (as against a Redis restarting); notes each try."""

    def __init__(self, *, down_for: str = "") -> None:
        super().__init__(_nothing_spent)
        self.down = True
        self.down_for = down_for  # only windows of this period fail ("": all)
        self.tries: list[tuple[str, bool]] = []

    async def settle(self, window, reserved, actual, request_id, *, again=False):  # type: ignore[no-untyped-def]
        self.tries.append((window.period, again))
        if self.down and window.period.startswith(self.down_for):
            raise ConnectionError("connection refused")
        return await super().settle(window, reserved, actual, request_id)


def _fast() -> Retries:
    return Retries(first_delay=0.01, max_delay=0.02)


async def _drained(retries: Retries) -> None:
    with anyio.fail_after(2):
        while len(retries):  # noqa: ASYNC110 - a count, not an event
            await anyio.sleep(0.01)


def _budgets(store: Flaky, retries: Retries) -> BudgetManager:
    rules = [BudgetRule(key="*", period="day", limit=1.0), BudgetRule(key="*", period="month", limit=1.0)]
    return BudgetManager(rules, store, retries)


async def test_a_failed_settlement_reaches_the_store_once_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, retries = Flaky(down_for="month"), _fast()
    budgets = _budgets(store, retries)
    day, month = budgets.windows_for(None, "gpt-4o")
    reservation = await budgets.reserve(None, "gpt-4o", 0.5, "req-1")
    await budgets.settle(reservation, 0.2)  # the day settles; the month waits
    assert await store.usage(day) == (200_000_000, 0)
    assert await store.usage(month) == (0, 500_000_000)
    assert len(retries) == 1 and "to be tried again" in caplog.text
    await anyio.sleep(0.1)
    assert len(retries) == 1 and len(store.tries) > 4  # still down: kept, tried again
    store.down = False
    await _drained(retries)
    assert await store.usage(month) == (200_000_000, 0)  # the spend counted, the reservation back
    # The first tries as they came; the retries "again", which the stores make count once.
    assert store.tries[:2] == [("day", False), ("month", False)]
    assert {again for _, again in store.tries[2:]} == {True}
    await retries.aclose()


async def test_a_release_that_fails_is_kept_and_shutdown_tries_it() -> None:
    store = Flaky()
    budgets = BudgetManager([BudgetRule(key="*", period="day", limit=1.0)], store)  # retries of its own
    day = budgets.windows_for(None, "gpt-4o")[0]
    reservation = await budgets.reserve(None, "gpt-4o", 0.5, "req-1")
    await budgets.release(reservation)
    assert len(budgets.retries) == 1
    assert await store.usage(day) == (0, 500_000_000)
    store.down = False
    await budgets.aclose()  # shutting down tries once more
    assert len(budgets.retries) == 0
    assert store.tries[-1] == ("day", True)


async def test_oldest_first_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    store = Flaky()
    retries = Retries(limit=2, first_delay=60)
    window = BudgetManager([BudgetRule(key="*", period="day", limit=1.0)], store).windows_for(None, "m")[0]
    for n in range(3):
        retries.add(f"r{n}", partial(store.settle, window, 0, 10**n, f"r{n}", again=True))
    assert len(retries) == 2 and "dropped r0" in caplog.text
    store.down = False
    assert await retries.try_all()
    assert await store.usage(window) == (110, 0)  # r1 and r2
    await retries.aclose()


async def test_what_never_reaches_the_store_is_logged_at_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    store = Flaky()
    retries = Retries(first_delay=60)
    window = BudgetManager([BudgetRule(key="*", period="day", limit=1.0)], store).windows_for(None, "m")[0]
    retries.add("r", partial(store.settle, window, 0, 5, "r"))
    with caplog.at_level(logging.ERROR, logger="llmrouter.accounting"):
        await retries.aclose()
    assert "1 settlements never reached their store" in caplog.text


class ReleaseFailsOnce(MemoryLimiter):
    """Its first release fails (its Redis blinked)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def release(self, ticket, actual_tokens):  # type: ignore[no-untyped-def]
        if not self.failed:
            self.failed = True
            raise ConnectionError("connection reset")
        await super().release(ticket, actual_tokens)


async def test_a_rate_limit_slot_the_limiter_failed_to_release_is_released_later() -> None:
    retries = _fast()
    hooks = AccountingHooks(limiter=ReleaseFailsOnce(), limits=LimitsConfig(concurrency=1), retries=retries)
    ctx = RequestContext(model_group="g", max_cost=0.0)
    await hooks.before_request(ctx)
    await hooks.after_request(ctx)  # the release fails: the slot is still taken
    with pytest.raises(RateLimitError):
        await hooks.before_request(RequestContext(model_group="g", max_cost=0.0))
    await _drained(retries)
    await hooks.before_request(RequestContext(model_group="g", max_cost=0.0))  # released by the retry
    await retries.aclose()


async def test_give_backs_wait_apart_and_their_drops_are_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """During an outage each admission whose reply was lost leaves a give-back (most
    free nothing): they waited among the settlements, evicting their real spend past
    the limit, and each logged a warning. Past their own limit the new ones are dropped:
    dropping the oldest dropped those sent as the store stopped answering, which hold
    what a long outage's later ones mostly do not."""
    retries = Retries(limit=1, first_delay=60)
    retries.add("a settlement", partial(anyio.sleep, 0))
    retries.give_backs = GiveBacks(limit=2, first_delay=0.01)
    given_back: list[int] = []

    async def give_back(n: int) -> None:
        given_back.append(n)

    with caplog.at_level(logging.INFO, logger="llmrouter.accounting"):
        for n in range(5):
            retries.give_backs.add(partial(give_back, n))
        assert len(retries.give_backs) == 2
        assert [what for what, _ in retries._waiting] == ["a settlement"]
        with anyio.fail_after(2):
            while len(retries.give_backs):  # noqa: ASYNC110 - a count, not an event
                await anyio.sleep(0.01)
    assert given_back == [0, 1]
    assert [record.getMessage() for record in caplog.records] == [
        "accounting: 3 give-backs of admissions whose reply was lost were dropped (over 2 waited): "
        "what they may hold waits for its lease"
    ]
    await retries.aclose()


async def test_give_backs_left_at_shutdown_are_tried_then_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    give_backs = GiveBacks(first_delay=60)

    async def refused() -> None:
        raise ConnectionError("connection reset")

    for _ in range(3):
        give_backs.add(refused)
    with caplog.at_level(logging.WARNING, logger="llmrouter.accounting"):
        await give_backs.aclose()
    assert [record.getMessage() for record in caplog.records] == [
        "accounting: 3 give-backs of admissions whose reply was lost never reached their store: "
        "what they may hold waits for its lease"
    ]


async def test_what_an_admission_holds_for_certain_is_never_dropped() -> None:
    # Given back in the background (a failed admission's 503 does not wait for it), and
    # with the settlements when the give-backs' lane is full.
    retries = Retries(first_delay=60)
    retries.give_backs = GiveBacks(limit=1, first_delay=60)
    given_back: list[str] = []

    async def give_back(what: str) -> None:
        given_back.append(what)

    retries.give_backs.add(partial(give_back, "maybe held"))
    retries.give_back_held("held", partial(give_back, "held"))
    assert len(retries.give_backs) == 1 and [what for what, _ in retries._waiting] == ["held"]
    await retries.aclose()
    assert sorted(given_back) == ["held", "maybe held"]
