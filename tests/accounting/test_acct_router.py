"""Accounting through the real Router with an in-process scripted provider."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from llmrouter.accounting import Accounting
from llmrouter.accounting.budgets import to_units
from llmrouter.accounting.config import BudgetRule
from llmrouter.config import Deployment, Price
from llmrouter.context import RequestContext
from llmrouter.errors import BudgetExceededError, PermissionDeniedError, RateLimitError
from llmrouter.router import Router
from llmrouter.testing.scripted import ScriptedProvider, Step
from llmrouter.types import Usage

from .conftest import make_config

pytestmark = pytest.mark.anyio

PRICE = Price(input=1.0, output=2.0)
REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 20}


def _router(acct: Accounting, step: Step) -> tuple[Router, ScriptedProvider]:
    provider = ScriptedProvider("gpt-4o-mini", default=step)
    router = Router(hooks=[acct.hooks])
    router.add_deployment(
        "gpt-4o-mini", provider, Deployment(provider="scripted", model="gpt-4o-mini", price=PRICE)
    )
    return router, provider


async def _probe() -> RequestContext:
    """What the router estimates and reserves for REQUEST (no accounting involved)."""
    probe = RequestContext()
    router = Router()
    router.add_deployment(
        "gpt-4o-mini",
        ScriptedProvider("gpt-4o-mini"),
        Deployment(provider="scripted", model="gpt-4o-mini", price=PRICE),
    )
    async with router:
        await router.chat(REQUEST, context=probe)
    return probe


async def test_concurrent_requests_through_the_router_never_overspend(
    sqlite_url: str, tmp_path: Path
) -> None:
    probe = await _probe()
    per_request = probe.max_cost
    assert per_request and per_request > 0
    # The answer uses the whole output limit and as many prompt tokens as the router
    # estimated, so each request costs exactly what it reserved: exactly 5 fit.
    usage = Usage(
        prompt_tokens=probe.prompt_tokens_estimate,
        completion_tokens=20,
        total_tokens=probe.prompt_tokens_estimate + 20,
    )
    config = make_config(
        sqlite_url, tmp_path, budgets=[BudgetRule(key="*", period="day", limit=5 * per_request)]
    )
    async with Accounting(config) as acct:
        router, provider = _router(acct, Step(usage=usage, delay=0.01))
        ok = refused = 0

        async def one() -> None:
            nonlocal ok, refused
            try:
                await router.chat(REQUEST)
                ok += 1
            except BudgetExceededError:
                refused += 1

        async with router, anyio.create_task_group() as tg:
            for _ in range(60):
                tg.start_soon(one)
        assert ok == 5 and refused == 55
        assert provider.record.calls == 5  # refused requests never reached the provider
        window = acct.budgets.windows_for(None, "gpt-4o-mini")[0]
        assert await acct.budgets.store.usage(window) == (5 * to_units(per_request), 0)
        report = await acct.usage(by=["model", "status"])
    by_status = {r["status"]: r for r in report}
    assert by_status["ok"]["requests"] == 5
    assert by_status["ok"]["cost"] == pytest.approx(5 * per_request)
    assert by_status["rejected"]["requests"] == 55


async def test_streams_cut_short_are_billed_and_keys_restricted(sqlite_url: str, tmp_path: Path) -> None:
    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        _key, secret = await acct.keys.create("streamer", allowed_models=["gpt-4o-mini"], rpm=2)
        router, _provider = _router(
            acct, Step(text="one two three four five six seven eight", chunk_delay=0.01)
        )
        async with router:
            ctx = RequestContext(principal=await acct.authenticate(secret))
            stream = router.stream({**REQUEST, "stream": True}, context=ctx)
            chunks = 0
            async for _chunk in stream:
                chunks += 1
                if chunks == 3:
                    break  # the client went away
            await stream.aclose()
            router.add_deployment(
                "gpt-4o", ScriptedProvider("gpt-4o"), Deployment(provider="scripted", model="gpt-4o")
            )
            with pytest.raises(PermissionDeniedError):
                await router.chat(
                    {**REQUEST, "model": "gpt-4o"}, context=RequestContext(principal=ctx.principal)
                )
            await router.chat(REQUEST, context=RequestContext(principal=ctx.principal))
            with pytest.raises(RateLimitError):
                await router.chat(REQUEST, context=RequestContext(principal=ctx.principal))
        rows = await acct.usage(by=["key", "status"])
    cancelled = next(r for r in rows if r["status"] == "cancelled")
    assert (
        cancelled["key_name"] == "streamer" and cancelled["completion_tokens"] > 0 and cancelled["cost"] > 0
    )


async def test_requests_refused_by_the_router_get_one_rejected_row(sqlite_url: str, tmp_path: Path) -> None:
    from llmrouter.errors import ModelNotFoundError

    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        key, _secret = await acct.keys.create("typo")
        router, _ = _router(acct, Step())
        async with router:
            with pytest.raises(ModelNotFoundError):
                await router.chat({**REQUEST, "model": "gtp-4o"}, context=RequestContext(principal=key))
        rows = await acct.usage(by=["key", "model", "status"])
    assert [(r["key_name"], r["model"], r["status"], r["requests"]) for r in rows] == [
        ("typo", "gtp-4o", "rejected", 1)
    ]


async def test_a_request_cancelled_during_settlement_is_still_billed_and_released(
    sqlite_url: str, tmp_path: Path
) -> None:
    """asyncio.timeout (or a client leaving) while the budget store settles - a Redis or
    database round trip - used to skip the ledger row and keep the concurrency slot."""
    import asyncio

    from llmrouter.accounting.config import LimitsConfig

    config = make_config(
        sqlite_url,
        tmp_path,
        budgets=[BudgetRule(key="*", period="day", limit=100.0)],
        limits=LimitsConfig(concurrency=1),
    )
    async with Accounting(config) as acct:
        settling = asyncio.Event()

        class NetworkStore:
            """The budget store on the network: every settle waits on a round trip."""

            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

            async def settle(self, *args: Any, **kwargs: Any) -> int:
                settling.set()
                await asyncio.sleep(0.05)
                return await self.inner.settle(*args, **kwargs)

        store = acct.budgets.store = NetworkStore(acct.budgets.store)
        assert not acct.hooks.settles_inline
        router, _provider = _router(acct, Step(text="hello there"))
        async with router:
            task = asyncio.create_task(router.chat(REQUEST))
            await settling.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The one concurrency slot is free again, and the budget holds no reservation.
            await router.chat(REQUEST)
        window = acct.budgets.windows_for(None, "gpt-4o-mini")[0]
        spent, reserved = await store.usage(window)
        assert spent > 0 and reserved == 0
        rows = await acct.usage(by=["status"])
    assert {r["status"]: r["requests"] for r in rows} == {"ok": 2}


async def test_accounting_settles_inline_only_with_stores_in_this_process(
    sqlite_url: str, tmp_path: Path
) -> None:
    config = make_config(sqlite_url, tmp_path, budgets=[BudgetRule(key="*", period="day", limit=1.0)])
    async with Accounting(config) as acct:
        assert acct.hooks.settles_inline  # memory budgets and limits, a queued ledger row
        acct.hooks.limiter = object()  # type: ignore[assignment] # e.g. the Redis limiter
        assert not acct.hooks.settles_inline


async def test_a_fallback_the_key_may_not_use_is_passed_over(sqlite_url: str, tmp_path: Path) -> None:
    """A key allowed only ``gpt-4o-mini`` is not served (nor billed) by its dear fallback;
    one whose allow-list names the fallback's alias is."""
    from llmrouter.config import ModelGroup
    from llmrouter.errors import UpstreamError

    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        cheap_only, _ = await acct.keys.create("cheap-only", allowed_models=["gpt-4o-mini"])
        both, _ = await acct.keys.create("both", allowed_models=["gpt-4o-mini", "premium"])
        router, _ = _router(acct, Step(error=UpstreamError("down", retryable=False)))
        dear = ScriptedProvider("gpt-4o", default=Step(text="dear answer"))
        router.add_deployment("gpt-4o", dear, Deployment(provider="scripted", model="gpt-4o", price=PRICE))
        router.groups["gpt-4o-mini"].config = ModelGroup(
            name="gpt-4o-mini", deployments=[], fallbacks=["gpt-4o"]
        )
        router.groups["gpt-4o"].config = ModelGroup(name="gpt-4o", deployments=[], aliases=["premium"])
        async with router:
            with pytest.raises(UpstreamError, match="down"):
                await router.chat(REQUEST, context=RequestContext(principal=cheap_only))
            assert dear.record.calls == 0
            answer = await router.chat(REQUEST, context=RequestContext(principal=both))
            assert answer.choices[0].message.content == "dear answer"
        rows = await acct.usage(by=["key", "model", "status"])
    assert sorted((r["key_name"], r["model"], r["status"]) for r in rows) == [
        ("both", "gpt-4o", "ok"),
        ("cheap-only", "gpt-4o-mini", "error"),
    ]


async def test_a_fallback_the_key_may_not_use_does_not_price_the_request(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The reservation is what the request may cost where it may be served: a dear
    fallback the key cannot use made a cheap request over its budget."""
    from llmrouter.config import ModelGroup

    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        cheap_only, _ = await acct.keys.create("cheap-only", allowed_models=["gpt-4o-mini"])
        router, _ = _router(acct, Step(text="cheap answer"))
        dear = ScriptedProvider("gpt-4o", default=Step(text="dear answer"))
        router.add_deployment(
            "gpt-4o",
            dear,
            Deployment(provider="scripted", model="gpt-4o", price=Price(input=1000.0, output=1000.0)),
        )
        router.groups["gpt-4o-mini"].config = ModelGroup(
            name="gpt-4o-mini", deployments=[], fallbacks=["gpt-4o"]
        )
        async with router:
            ctx = RequestContext(principal=cheap_only)
            await router.chat(REQUEST, context=ctx)
    probe = await _probe()
    assert ctx.max_cost == pytest.approx(probe.max_cost)


async def test_a_per_model_budget_holds_for_requests_its_group_serves_as_a_fallback(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A budget on ``gpt-4o`` counted only requests that asked for it: requests for a
    failing group that fell back to ``gpt-4o`` spent it three times over unchecked."""
    from llmrouter.config import ModelGroup
    from llmrouter.errors import NoDeploymentAvailableError, UpstreamError

    probe = await _probe()
    per_request = probe.max_cost
    assert per_request
    config = make_config(
        sqlite_url,
        tmp_path,
        budgets=[BudgetRule(key="*", model="gpt-4o", period="day", limit=2.5 * per_request)],
    )
    async with Accounting(config) as acct:
        router, _ = _router(acct, Step(error=UpstreamError("down", retryable=False)))
        dear = ScriptedProvider("gpt-4o", default=Step(text="dear answer", usage=_whole_bound(probe)))
        router.add_deployment("gpt-4o", dear, Deployment(provider="scripted", model="gpt-4o", price=PRICE))
        router.groups["gpt-4o-mini"].config = ModelGroup(
            name="gpt-4o-mini", deployments=[], fallbacks=["gpt-4o"]
        )
        outcomes = []
        async with router:
            for _ in range(4):
                try:
                    await router.chat(REQUEST)
                    outcomes.append("served")
                except (
                    UpstreamError,
                    NoDeploymentAvailableError,
                ):  # its group failed (then cooled); the spent fallback passed over
                    outcomes.append("failed")
        assert outcomes == ["served", "served", "failed", "failed"]
        assert dear.record.calls == 2
        rows = await acct.usage(by=["model", "status"])
    served = next(row for row in rows if row["status"] == "ok")
    assert served["model"] == "gpt-4o" and served["cost"] <= 2.5 * per_request


def _whole_bound(probe: RequestContext) -> Usage:
    """Usage that costs exactly what the router reserved for REQUEST."""
    assert probe.prompt_tokens_estimate is not None
    return Usage(
        prompt_tokens=probe.prompt_tokens_estimate,
        completion_tokens=REQUEST["max_tokens"],  # type: ignore[arg-type]
        total_tokens=probe.prompt_tokens_estimate + REQUEST["max_tokens"],  # type: ignore[operator]
    )


async def test_a_tpm_limit_charges_an_unpriced_requests_prompt_at_admission(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The router counts a prompt only to price it: an unpriced request came to the TPM
    limit as an empty prompt, so one over the limit was admitted (and concurrent ones
    without bound until they ended)."""
    from llmrouter.accounting.limits import KeyLimitError

    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        key, _ = await acct.keys.create("k", tpm=100)
        router = Router(hooks=[acct.hooks])
        provider = ScriptedProvider("free")
        router.add_deployment("free", provider, Deployment(provider="scripted", model="free"))  # no price
        request = {"model": "free", "max_tokens": 5, "messages": [{"role": "user", "content": "word " * 300}]}
        async with router:
            with pytest.raises(KeyLimitError, match="request too large"):
                await router.chat(request, context=RequestContext(principal=key))
            ctx = RequestContext(principal=key)
            await router.chat({**request, "messages": [{"role": "user", "content": "hi"}]}, context=ctx)
    assert provider.record.calls == 1
    assert ctx.extra_headers["x-ratelimit-remaining-tokens"] != "100", "the prompt is charged"


async def test_a_fallbacks_spent_budget_does_not_refuse_what_its_own_group_serves(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A fallback's per-model budget is best effort: reserved when it takes the request,
    the fallback passed over when not; the request itself is refused only by its own
    group's budgets (the first fix refused a healthy group's requests for the day)."""
    from llmrouter.config import ModelGroup

    probe = await _probe()
    assert probe.max_cost
    config = make_config(
        sqlite_url,
        tmp_path,
        budgets=[BudgetRule(key="*", model="gpt-4o", period="day", limit=0.5 * probe.max_cost)],
    )
    async with Accounting(config) as acct:
        router, _ = _router(acct, Step(text="cheap answer"))
        router.add_deployment(
            "gpt-4o", ScriptedProvider("gpt-4o"), Deployment(provider="scripted", model="gpt-4o", price=PRICE)
        )
        router.groups["gpt-4o-mini"].config = ModelGroup(
            name="gpt-4o-mini", deployments=[], fallbacks=["gpt-4o"]
        )
        async with router:
            ctx = RequestContext()
            answer = await router.chat(REQUEST, context=ctx)
    assert answer.choices[0].message.content == "cheap answer" and ctx.fallback_groups == ()
    assert "budget" not in ctx.metadata
