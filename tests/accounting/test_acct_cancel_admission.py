"""Admission that fails half-way (cancelled, or a store down) gives its rate-limit slot back."""

from __future__ import annotations

import anyio
import pytest

from llmrouter.accounting.config import LimitsConfig
from llmrouter.accounting.hooks import AccountingHooks
from llmrouter.accounting.limits import EffectiveLimits, MemoryLimiter
from llmrouter.context import RequestContext
from llmrouter.errors import AccountingUnavailableError

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
