"""A direct ``provider/model`` group holding an admitted request is not evicted: a request
is admitted (its provider started) before it is in flight, and in between (its hooks, its
cost bound, the cache lookup) another client's new name evicted its group, closed its
provider, and the request was sent to the closed one (a 502), or billed nothing."""

import anyio
import pytest

from llmrouter import Router
from llmrouter.config import Config, Price, Retry, RouterConfig
from llmrouter.context import RequestContext
from llmrouter.errors import ModelNotFoundError, PermissionDeniedError, UpstreamConnectionError
from llmrouter.hooks import RouterHooks
from llmrouter.registry import register_provider
from llmrouter.testing.scripted import ScriptedProvider, Step

pytestmark = pytest.mark.anyio


def chat_body(model):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


class Closable(ScriptedProvider):
    """Like an HTTP provider: a closed client cannot send."""

    direct = True

    async def start(self) -> None:
        await anyio.sleep(0.001)
        await super().start()

    async def chat(self, request):
        if self.closed:
            raise RuntimeError("Cannot send a request, as the client has been closed")
        return await super().chat(request)


class Junk(ScriptedProvider):
    """A direct provider whose models do not exist (a daemon's 502)."""

    direct = True

    def __init__(self, model: str = "scripted-model", options=None) -> None:
        super().__init__(model, options, default=Step(error=UpstreamConnectionError("no such model")))


register_provider("evict-admitted", Closable)
register_provider("evict-admitted-junk", Junk)


class SlowAdmission(RouterHooks):
    """A before_request that waits (accounting's key and budget check on a database)."""

    def __init__(self, model: str, refuse: bool = False) -> None:
        self.model, self.refuse = model, refuse
        self.entered = anyio.Event()
        self.go_on = anyio.Event()

    async def before_request(self, ctx):
        if ctx.model_group == self.model:
            self.entered.set()
            await self.go_on.wait()
            if self.refuse:
                raise PermissionDeniedError("not for you")


def one_slot(**kwargs) -> Config:
    return Config(router=RouterConfig(max_direct_models=1, retry=Retry(attempts=0)), **kwargs)


async def test_a_request_in_its_hooks_keeps_its_direct_group_and_is_billed_at_its_price():
    hook = SlowAdmission("evict-admitted/x")
    router = Router(one_slot(pricing={"x": Price(input=1.0, output=1.0)}), hooks=[hook])
    ctx = RequestContext()
    async with router:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: router.chat(chat_body("evict-admitted/x"), context=ctx))
            await hook.entered.wait()
            provider = router.groups["evict-admitted/x"].deployments[0].provider
            assert isinstance(provider, Closable)
            with pytest.raises(ModelNotFoundError):  # the only slot is x's
                await router.chat(chat_body("evict-admitted/y"))
            hook.go_on.set()
        assert isinstance(provider, Closable) and not provider.closed
        assert ctx.status == "ok"
        assert ctx.cost_source == "price_table" and ctx.cost and ctx.cost > 0
        assert "evict-admitted/x" in router.groups


async def test_many_new_direct_names_at_once_never_reach_a_closed_provider():
    # No hooks: a request's provider finished starting, then another request's name
    # evicted its group before it was dispatched.
    router = Router(Config(router=RouterConfig(max_direct_models=2)))
    outcome = {"ok": 0, "404": 0}
    async with router:

        async def ask(i):
            try:
                await router.chat(chat_body(f"evict-admitted/m{i}"))
                outcome["ok"] += 1
            except ModelNotFoundError:
                outcome["404"] += 1

        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(ask, i)
                if i % 3 == 0:
                    await anyio.sleep(0.0005)
    assert outcome["ok"] >= 2 and outcome["ok"] + outcome["404"] == 60
    assert not router._holding and all(g.admitted == 0 for g in router.groups.values())


@pytest.mark.parametrize("end", ["upstream_failure", "hook_refusal", "cancelled", "stream"])
async def test_a_direct_group_is_evictable_again_once_its_request_is_over(end):
    model = "evict-admitted-junk/x"
    hook = SlowAdmission(model, refuse=end == "hook_refusal")
    router = Router(one_slot(), hooks=[hook])
    async with router:
        if end == "cancelled":
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(router.chat, chat_body(model))
                    await hook.entered.wait()
                    scope.cancel()
        else:
            hook.go_on.set()
            with pytest.raises((UpstreamConnectionError, PermissionDeniedError)):
                if end == "stream":
                    async for _ in router.stream(chat_body(model)):
                        pass
                else:
                    await router.chat(chat_body(model))
        group = router.groups[model]
        assert group.admitted == 0 and not router._holding
        await router.chat(chat_body("evict-admitted/y"))  # x never served: its slot is taken
        assert model not in router.groups


async def test_a_direct_group_in_a_fallback_chain_is_held_too():
    # A configured group whose fallback names a direct group that exists.
    hook = SlowAdmission("g")
    router = Router(one_slot(), hooks=[hook])
    async with router:
        with pytest.raises(UpstreamConnectionError):
            await router.chat(chat_body("evict-admitted-junk/x"))  # x exists, never served
        router.add_deployment("g", ScriptedProvider(default=Step(error=UpstreamConnectionError("down"))))
        router.groups["g"].config.fallbacks.append("evict-admitted-junk/x")

        async def through_the_fallback():
            with pytest.raises(UpstreamConnectionError):
                await router.chat(chat_body("g"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(through_the_fallback)
            await hook.entered.wait()
            with pytest.raises(ModelNotFoundError):
                await router.chat(chat_body("evict-admitted/y"))
            hook.go_on.set()
        fallback = router.groups["evict-admitted-junk/x"].deployments[0].provider
        assert isinstance(fallback, Junk) and not fallback.closed
