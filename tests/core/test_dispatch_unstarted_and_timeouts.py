"""Dispatch never sends to a deployment whose start has not been tried (one added to a live
group while a request ran was its retry's pick, and failed as unstarted), and only the
router's own time limit feeds a timeout into the latency averages (an upstream's 504
answered at once made a failing deployment look fast to ``lowest_latency``)."""

import math

import anyio
import pytest

from llmrouter import Router
from llmrouter.config import Config, Cooldown, Deployment, Retry, RouterConfig, Timeouts
from llmrouter.context import RequestContext
from llmrouter.errors import UpstreamTimeoutError, UpstreamUnavailableError, error_for_status
from llmrouter.testing.scripted import ScriptedProvider, Step

pytestmark = pytest.mark.anyio


def chat_body(model="g"):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


class NeedsStart(ScriptedProvider):
    """Fails like a real provider whose client is made in start()."""

    async def start(self) -> None:
        await anyio.sleep(0.01)
        await super().start()

    unstarted_calls = 0

    async def chat(self, request):
        if not self.started:
            self.unstarted_calls += 1
            raise RuntimeError("used before start()")
        return await super().chat(request)


async def test_a_deployment_added_while_a_request_runs_is_not_its_retrys_pick():
    down = ScriptedProvider(default=Step(delay=0.1, error=UpstreamUnavailableError("down")))
    router = Router(
        Config(router=RouterConfig(retry=Retry(attempts=2, backoff_base=0.001, backoff_max=0.01)))
    )
    router.add_deployment("g", down)
    router.groups["g"].cooldown = Cooldown(failures=100, seconds=30)
    added = NeedsStart()
    ctx = RequestContext()
    async with router:

        async def first():
            with pytest.raises(UpstreamUnavailableError):
                await router.chat(chat_body(), context=ctx)

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await anyio.sleep(0.03)  # admitted, its first attempt running
            state = router.add_deployment("g", added)
        assert added.unstarted_calls == 0 and state.failures == 0 and ctx.attempts == 3
        # The next request admitted starts it, and may use it.
        state.config = Deployment(provider="scripted", model=added.model, priority=-1)
        reply = await router.chat(chat_body())
        assert added.started and reply.choices[0].message.content and added.record.calls == 1


async def test_an_upstreams_immediate_504_is_not_a_fast_first_token():
    gateway = ScriptedProvider(default=Step(error=error_for_status(504, "gateway timeout")))
    router = Router(Config(router=RouterConfig(retry=Retry(attempts=0))))
    deployment = router.add_deployment("g", gateway)
    deployment.ewma_ttft = deployment.ewma_duration = 0.5
    with pytest.raises(UpstreamTimeoutError):
        await router.chat(chat_body())
    with pytest.raises(UpstreamTimeoutError):
        async for _ in router.stream(chat_body()):
            pass
    assert (deployment.ewma_ttft, deployment.ewma_duration) == (0.5, 0.5)


@pytest.mark.parametrize("stream", [False, True])
async def test_the_routers_own_time_limit_counts_at_least_the_limit(stream):
    slow = ScriptedProvider(default=Step(delay=5))
    router = Router(Config(router=RouterConfig(retry=Retry(attempts=0))))
    deployment = router.add_deployment("g", slow)
    router.groups["g"].timeouts = Timeouts(first_token=0.05, total=0.05)
    with anyio.fail_after(2), pytest.raises(UpstreamTimeoutError):
        if stream:
            async for _ in router.stream(chat_body()):
                pass
        else:
            await router.chat(chat_body())
    assert deployment.ewma_ttft is not None and deployment.ewma_ttft >= 0.05
    assert deployment.ewma_duration is not None and deployment.ewma_duration >= 0.05
    assert math.isfinite(deployment.ewma_ttft)
