"""Budget settlements the store fails (down or slow) are kept and tried again until it
takes them, so that a window's spend is not lost and its reservation goes back."""

from __future__ import annotations

import logging

import anyio
import pytest

from llmrouter.accounting.budgets import BudgetManager, MemoryBudgetStore
from llmrouter.accounting.config import BudgetRule
from llmrouter.accounting.unsettled import Settlement, Unsettled

pytestmark = pytest.mark.anyio


async def _nothing_spent(_: object) -> int:
    return 0


class Flaky(MemoryBudgetStore):
    """Settles fail while ``down`` (as against a Redis restarting); counts the tries."""

    def __init__(self, *, down_for: str = "") -> None:
        super().__init__(_nothing_spent)
        self.down = True
        self.down_for = down_for  # only windows of this period fail ("" : all)
        self.tries = 0
        self.agains: list[tuple[str, bool]] = []

    async def settle(self, window, reserved, actual, request_id, *, again=False):  # type: ignore[no-untyped-def]
        self.tries += 1
        self.agains.append((window.period, again))
        if self.down and window.period.startswith(self.down_for):
            raise ConnectionError("connection refused")
        return await super().settle(window, reserved, actual, request_id)


def _manager(store: Flaky) -> BudgetManager:
    rules = [BudgetRule(key="*", period="day", limit=1.0), BudgetRule(key="*", period="month", limit=1.0)]
    budgets = BudgetManager(rules, store)
    budgets.unsettled = Unsettled(store, first_delay=0.01, max_delay=0.02)
    return budgets


async def test_a_failed_settlement_reaches_the_store_once_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Flaky(down_for="month")
    budgets = _manager(store)
    day, month = budgets.windows_for(None, "gpt-4o")
    reservation = await budgets.reserve(None, "gpt-4o", 0.5, "req-1")
    await budgets.settle(reservation, 0.2)  # the day settles; the month waits
    assert await store.usage(day) == (200_000_000, 0)
    assert await store.usage(month) == (0, 500_000_000)
    assert len(budgets.unsettled) == 1 and "to be tried again" in caplog.text
    await anyio.sleep(0.1)
    assert len(budgets.unsettled) == 1 and store.tries > 3  # still down: kept, tried again
    store.down = False
    with anyio.fail_after(2):
        while len(budgets.unsettled):  # noqa: ASYNC110 - a count, not an event
            await anyio.sleep(0.01)
    assert await store.usage(month) == (200_000_000, 0)  # the spend counted, the reservation back
    # The first tries as they come; the retries "again", which the stores make count once.
    assert store.agains[:2] == [("day", False), ("month", False)]
    assert {again for _, again in store.agains[2:]} == {True}
    await budgets.aclose()


async def test_a_release_that_fails_is_kept_too() -> None:
    store = Flaky()
    budgets = _manager(store)
    day, _ = budgets.windows_for(None, "gpt-4o")
    reservation = await budgets.reserve(None, "gpt-4o", 0.5, "req-1")
    await budgets.release(reservation)
    assert len(budgets.unsettled) == 2
    assert await store.usage(day) == (0, 500_000_000)
    store.down = False
    await budgets.aclose()  # shutting down tries once more
    assert len(budgets.unsettled) == 0
    assert await store.usage(day) == (0, 0)


async def test_oldest_first_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    store = Flaky()
    unsettled = Unsettled(store, limit=2, first_delay=60)
    window = BudgetManager([BudgetRule(key="*", period="day", limit=1.0)], store).windows_for(None, "m")[0]
    for n in range(3):
        unsettled.add(Settlement(window, 0, 10**n, f"r{n}"))
    assert len(unsettled) == 2 and "dropped r0's" in caplog.text
    store.down = False
    assert await unsettled.try_all()
    assert await store.usage(window) == (110, 0)  # r1 and r2
    await unsettled.aclose()


async def test_what_never_reaches_the_store_is_logged_at_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    store = Flaky()
    unsettled = Unsettled(store, first_delay=60)
    window = BudgetManager([BudgetRule(key="*", period="day", limit=1.0)], store).windows_for(None, "m")[0]
    unsettled.add(Settlement(window, 0, 5, "r"))
    with caplog.at_level(logging.ERROR, logger="llmrouter.accounting"):
        await unsettled.aclose()
    assert "1 settlements never reached the store" in caplog.text
