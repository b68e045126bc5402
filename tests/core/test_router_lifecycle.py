"""Router lifecycle: every deployment is started before it serves (whenever it is added),
a failed start is retried after aclose(), and clients' direct names cannot lock out
direct routing."""

import anyio
import anyio.lowlevel
import pytest

from llmrouter import Router
from llmrouter.config import Config, Deployment, ModelGroup, Retry, RouterConfig
from llmrouter.errors import ModelNotFoundError, PermissionDeniedError, UpstreamConnectionError
from llmrouter.hooks import RouterHooks
from llmrouter.registry import register_provider
from llmrouter.testing.scripted import ScriptedProvider, Step

pytestmark = pytest.mark.anyio


def chat_body(model="g"):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


class NeedsStart(ScriptedProvider):
    """Fails like a real provider whose client is made in start()."""

    starts = 0

    async def start(self) -> None:
        type(self).starts += 1
        await anyio.sleep(0.01)
        await super().start()

    async def chat(self, request):
        if not self.started:
            raise RuntimeError("used before start()")
        return await super().chat(request)


register_provider("needs-start", NeedsStart)


async def test_deployments_added_to_a_started_router_are_started_before_they_serve():
    async with Router() as router:
        provider = NeedsStart()
        router.add_deployment("g", provider)
        router.add_group(ModelGroup(name="h", deployments=[Deployment(provider="needs-start", model="m")]))
        for model in ("g", "h"):
            reply = await router.chat(chat_body(model))
            assert reply.choices[0].message.content
        assert provider.started and router.groups["h"].deployments[0].started


async def test_concurrent_first_requests_start_an_added_deployment_once():
    NeedsStart.starts = 0
    async with Router() as router:
        router.add_deployment("g", NeedsStart())
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(router.chat, chat_body())
    assert NeedsStart.starts == 1


async def test_a_request_does_not_wait_for_the_start_of_a_deployment_it_cannot_use():
    release = anyio.Event()

    class Slow(ScriptedProvider):
        async def start(self) -> None:
            await release.wait()

    async with Router() as router:
        router.add_deployment("g", ScriptedProvider())
        await router.chat(chat_body())
        router.add_deployment("slow", Slow())
        with anyio.fail_after(2):
            await router.chat(chat_body())
        release.set()


async def test_a_direct_name_arriving_while_the_router_starts_is_started():
    # start() snapshotted the deployments and set _started at its end, undoing the
    # restart the new direct group asked for: its provider was never started.
    entered, release = anyio.Event(), anyio.Event()

    class SlowStart(ScriptedProvider):
        async def start(self) -> None:
            entered.set()
            await release.wait()
            await super().start()

    register_provider("slow-start", SlowStart)
    router = Router(
        Config(models=[ModelGroup(name="g", deployments=[Deployment(provider="slow-start", model="m")])])
    )
    results = {}

    async def ask(model):
        results[model] = await router.chat(chat_body(model))

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "g")
        await entered.wait()  # the first request is inside start()
        tg.start_soon(ask, "needs-start/x")
        while "needs-start/x" not in router.groups:
            await anyio.lowlevel.checkpoint()
        release.set()
    assert set(results) == {"g", "needs-start/x"}
    assert router.groups["needs-start/x"].deployments[0].started
    await router.chat(chat_body("needs-start/x"))
    await router.aclose()


async def test_a_cancelled_start_is_tried_again_by_the_next_request():
    class Hangs(ScriptedProvider):
        tries = 0

        async def start(self) -> None:
            Hangs.tries += 1
            if Hangs.tries == 1:
                await anyio.sleep(10)
            await super().start()

    router = Router()
    provider = Hangs()
    router.add_deployment("g", provider)
    with anyio.move_on_after(0.05):
        await router.chat(chat_body())
    await router.chat(chat_body())
    assert Hangs.tries == 2 and provider.started


async def test_a_provider_that_failed_to_start_is_tried_again_after_aclose():
    class Flaky(ScriptedProvider):
        starts = 0

        async def start(self) -> None:
            Flaky.starts += 1
            if Flaky.starts == 1:
                raise ConnectionError("upstream not up yet")
            await super().start()

    router = Router()
    deployment = router.add_deployment("g", Flaky())
    async with router:
        assert deployment.start_error == "ConnectionError: upstream not up yet"
    assert deployment.start_error is None
    async with router:
        assert Flaky.starts == 2 and deployment.started
        await router.chat(chat_body())


# --- direct names ------------------------------------------------------------------------


class Direct(ScriptedProvider):
    """A direct provider: models named ``junk...`` do not exist (a daemon's 502)."""

    instances: list["Direct"] = []

    def __init__(self, model: str = "scripted-model", options=None) -> None:
        error = UpstreamConnectionError("no daemon answering") if model.startswith("junk") else None
        super().__init__(model, options, default=Step(text="ok", error=error))
        Direct.instances.append(self)


register_provider("direct-test", Direct)


def direct_router(limit=2, hooks=()):
    return Router(Config(router=RouterConfig(max_direct_models=limit, retry=Retry(attempts=0))), hooks=hooks)


async def test_a_direct_name_with_control_characters_is_refused_before_anything_is_made():
    router = direct_router()
    for name in ("direct-test/a\x00b", "direct-test/a\nb", "direct-test/\x1b[31m"):
        with pytest.raises(ModelNotFoundError) as info:
            await router.chat(chat_body(name))
        assert info.value.param == "model"
    assert router.groups == {} and router.deployments == []


async def test_failed_direct_names_are_not_listed_and_give_their_slot_to_new_names():
    router = direct_router(limit=2)
    await router.chat(chat_body("direct-test/good"))
    for i in range(5):  # each takes the slot of the one before
        with pytest.raises(UpstreamConnectionError):
            await router.chat(chat_body(f"direct-test/junk-{i}"))
    assert [m.id for m in (await router.list_models()).data] == ["direct-test/good"]
    await router.chat(chat_body("direct-test/other"))
    assert sorted(router.groups) == ["direct-test/good", "direct-test/other"]
    # Every slot holds a model that has served: a new name is refused, they are kept.
    with pytest.raises(ModelNotFoundError):
        await router.chat(chat_body("direct-test/third"))
    assert sorted(m.id for m in (await router.list_models()).data) == [
        "direct-test/good",
        "direct-test/other",
    ]
    evicted = [p for p in Direct.instances if p.model.startswith("junk")]
    assert len(evicted) == 5 and all(p.closed for p in evicted)
    await router.aclose()


async def test_direct_names_of_rejected_requests_do_not_keep_their_slots():
    class Deny(RouterHooks):
        async def before_request(self, ctx):
            if ctx.model_group.endswith("denied"):
                raise PermissionDeniedError("no")

    router = direct_router(limit=1, hooks=[Deny()])
    with pytest.raises(PermissionDeniedError):
        await router.chat(chat_body("direct-test/denied"))
    await router.chat(chat_body("direct-test/allowed"))
    assert list(router.groups) == ["direct-test/allowed"]


async def test_a_direct_group_in_use_is_not_evicted():
    release = anyio.Event()

    class Holds(Direct):
        async def chat(self, request):
            await release.wait()
            return await super().chat(request)

    register_provider("direct-holds", Holds)
    router = direct_router(limit=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(router.chat, chat_body("direct-holds/first"))
        while not router.deployments or not router.deployments[0].in_flight:
            await anyio.lowlevel.checkpoint()
        with pytest.raises(ModelNotFoundError):
            await router.chat(chat_body("direct-holds/second"))
        release.set()
    assert list(router.groups) == ["direct-holds/first"]
