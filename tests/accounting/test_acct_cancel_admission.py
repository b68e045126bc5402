"""A request cancelled while its budget is being reserved gives its rate-limit slot back."""

from __future__ import annotations

import anyio
import pytest

from llmrouter.accounting.config import LimitsConfig
from llmrouter.accounting.hooks import AccountingHooks
from llmrouter.accounting.limits import EffectiveLimits, MemoryLimiter
from llmrouter.context import RequestContext

pytestmark = pytest.mark.anyio


class StuckBudgets:
    """A budget store that never answers (a slow database), standing in for BudgetManager."""

    def may_apply(self, key: object) -> bool:
        return True

    async def reserve(self, *args: object) -> None:
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
