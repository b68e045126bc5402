"""Admission that fails half-way (cancelled, or a store down) gives its rate-limit slot back."""

from __future__ import annotations

import anyio
import pytest

from llmrouter.accounting.budgets import BudgetManager, BudgetWindow
from llmrouter.accounting.config import BudgetRule, LimitsConfig
from llmrouter.accounting.hooks import AccountingHooks
from llmrouter.accounting.limits import EffectiveLimits, LimitTicket, MemoryLimiter
from llmrouter.accounting.retries import Retries
from llmrouter.context import RequestContext
from llmrouter.errors import AccountingUnavailableError, BudgetExceededError

from .conftest import drained

pytestmark = pytest.mark.anyio


class StuckBudgets:
    """A budget store that never answers (a slow database), standing in for BudgetManager."""

    def may_apply(self, key: object) -> bool:
        return True

    async def reserve(self, *args: object, **kwargs: object) -> None:
        await anyio.sleep_forever()


async def test_cancel_during_budget_reservation_releases_the_concurrency_slot():
    limiter = MemoryLimiter()
    hooks = AccountingHooks(budgets=StuckBudgets(), limiter=limiter, limits=LimitsConfig(concurrency=1))  # type: ignore[arg-type]
    ctx = RequestContext(model_group="g", max_cost=0.0)
    with anyio.move_on_after(0.05):
        await hooks.before_request(ctx)
    # The one slot is free again: a fresh request can take it.
    ticket = await limiter.acquire("-", EffectiveLimits(concurrency=1), 0)
    await limiter.release(ticket, 0)


class FailingBudgets(StuckBudgets):
    """A budget store whose database is down."""

    async def reserve(self, *args: object, **kwargs: object) -> None:
        raise ConnectionError("connection refused")


class FailingRelease(MemoryLimiter):
    """A limiter that takes a slot, then cannot give it back (its Redis went away)."""

    async def release(self, *args: object) -> None:
        raise ConnectionError("connection reset")


async def test_a_store_failure_is_a_503_and_the_slot_goes_back():
    limiter = MemoryLimiter()
    hooks = AccountingHooks(budgets=FailingBudgets(), limiter=limiter, limits=LimitsConfig(concurrency=1))  # type: ignore[arg-type]
    with pytest.raises(AccountingUnavailableError) as info:
        await hooks.before_request(RequestContext(model_group="g", max_cost=0.0))
    assert info.value.http_status == 503 and info.value.headers() == {"Retry-After": "1"}
    assert isinstance(info.value.__cause__, ConnectionError)
    ticket = await limiter.acquire("-", EffectiveLimits(concurrency=1), 0)  # the slot is free
    await limiter.release(ticket, 0)

    # A release that fails too does not hide the 503.
    hooks = AccountingHooks(
        budgets=FailingBudgets(), limiter=FailingRelease(), limits=LimitsConfig(concurrency=1)
    )  # type: ignore[arg-type]
    with pytest.raises(AccountingUnavailableError):
        await hooks.before_request(RequestContext(model_group="g", max_cost=0.0))


class SettleFails(StuckBudgets):
    """Reserves, but its store is down by the time the request settles."""

    async def reserve(self, *args: object, **kwargs: object) -> object:
        from llmrouter.accounting.budgets import Reservation

        return Reservation(request_id="r")

    async def settle(self, *args: object) -> bool:
        raise ConnectionError("connection refused")


async def test_a_budget_that_cannot_settle_still_gives_the_slot_back(caplog: pytest.LogCaptureFixture):
    # With the budget store down at settling, the limits were never released: an
    # in-process concurrency slot stayed taken until the process restarted.
    limiter = MemoryLimiter()
    hooks = AccountingHooks(budgets=SettleFails(), limiter=limiter, limits=LimitsConfig(concurrency=1))  # type: ignore[arg-type]
    for _ in range(3):
        ctx = RequestContext(model_group="g", max_cost=0.0)
        await hooks.before_request(ctx)  # would be a 429 from the second on
        await hooks.after_request(ctx)
    assert "settling request" in caplog.text


class Rows:
    """A ledger writer that keeps its rows (the in-process part: no journal)."""

    journaling = False

    def __init__(self) -> None:
        self.rows: list[object] = []

    def record(self, row: object) -> None:
        self.rows.append(row)


async def test_a_request_cancelled_during_admission_has_its_row():
    """Cancelled while the budget store was slow (the client left, a caller's timeout):
    the request was made, so it is in the ledger, as cancelled, at no cost."""
    ledger = Rows()
    hooks = AccountingHooks(budgets=StuckBudgets(), ledger=ledger)  # type: ignore[arg-type]
    ctx = RequestContext(model_group="g", max_cost=0.0)
    with anyio.move_on_after(0.05):
        await hooks.before_request(ctx)
    (row,) = ledger.rows
    assert (row.status, row.cost, row.request_id) == ("cancelled", 0.0, ctx.request_id)  # type: ignore[attr-defined]
    await hooks.after_request(ctx)  # the router's after-hooks, should they run: still one row
    assert len(ledger.rows) == 1


class StopsAnswering:
    """A shared store (as Redis is) that answers the first reservation, then stops
    answering while ``frozen``: each later command times out. ``tried``: what was sent
    to it while frozen; ``given_back``: the budget windows and slots it gave back."""

    def __init__(self) -> None:
        self.frozen = False
        self.tried: list[str] = []
        self.given_back: list[str] = []

    def _command(self, what: str) -> None:
        if self.frozen:
            self.tried.append(what)
            raise TimeoutError("Timeout reading from 127.0.0.1:6379")  # after redis.timeout

    async def reserve(self, window: BudgetWindow, amount: int, request_id: str) -> tuple[bool, int, int]:
        self._command(f"reserve {window.period}")
        self.frozen = True  # the day's reply came; the month's never does
        return True, 0, amount

    async def settle(
        self, window: BudgetWindow, reserved: int, actual: int, request_id: str, *, again: bool = False
    ) -> int:
        self._command(f"settle {window.period}")
        self.given_back.append(window.period)
        return 0

    async def acquire(self, subject: str, limits: EffectiveLimits, tokens: int) -> LimitTicket:
        return LimitTicket(subject, limits, tokens, slot="s")

    async def release(self, ticket: LimitTicket, actual_tokens: int) -> None:
        self._command("release")
        self.given_back.append("slot")


async def test_a_store_that_stops_answering_half_way_is_a_503_without_waiting_again():
    # A slot and the day's budget taken, the month's reservation timed out: the request
    # then gave back what it held, waiting a timeout for each on a store that had stopped
    # answering (its 503 after 6 s with redis.timeout 2 s). Now that goes on in the
    # background, and is all given back once the store answers.
    store = StopsAnswering()
    retries = Retries()
    rules = [BudgetRule(key="*", period="day", limit=10.0), BudgetRule(key="*", period="month", limit=100.0)]
    budgets = BudgetManager(rules, store, retries)  # type: ignore[arg-type]
    hooks = AccountingHooks(
        budgets=budgets,
        limiter=store,  # type: ignore[arg-type]
        limits=LimitsConfig(concurrency=1),
        retries=retries,
    )
    with pytest.raises(AccountingUnavailableError):
        await hooks.before_request(RequestContext(model_group="g", max_cost=0.01))
    assert store.tried == ["reserve month"]  # nothing else waited on
    store.frozen = False
    await drained(retries.give_backs)
    # The month's too: its reservation may have reached the store though its reply did not.
    assert sorted(store.given_back) == ["day", "month", "slot"]
    assert len(retries) == 0
    await retries.aclose()


async def test_a_refusal_half_way_gives_back_at_once():
    # A budget refused after the limiter admitted: both stores have just answered, so
    # what was taken goes back before the 429 (the client's retry finds its slot free).
    class Refuses(StopsAnswering):
        async def reserve(self, window: BudgetWindow, amount: int, request_id: str) -> tuple[bool, int, int]:
            return window.period == "day", 0, amount

    store = Refuses()
    retries = Retries()
    rules = [BudgetRule(key="*", period="day", limit=10.0), BudgetRule(key="*", period="month", limit=100.0)]
    hooks = AccountingHooks(
        budgets=BudgetManager(rules, store, retries),  # type: ignore[arg-type]
        limiter=store,  # type: ignore[arg-type]
        limits=LimitsConfig(concurrency=1),
        retries=retries,
    )
    with pytest.raises(BudgetExceededError):
        await hooks.before_request(RequestContext(model_group="g", max_cost=0.01))
    assert store.given_back == ["day", "slot"] and len(retries.give_backs) == 0
    await retries.aclose()
