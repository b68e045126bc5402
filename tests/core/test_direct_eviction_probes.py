"""An evicted direct group's readiness probes go with it: clients naming new models while
``/ready`` is polled made the shared probe cache grow without end."""

import pytest

from llmrouter import Router
from llmrouter.config import Config, Retry, RouterConfig
from llmrouter.errors import UpstreamConnectionError
from llmrouter.probes import SharedProbes
from llmrouter.registry import register_provider
from llmrouter.testing.scripted import ScriptedProvider, Step

pytestmark = pytest.mark.anyio


class _Junk(ScriptedProvider):
    """A direct provider whose models do not exist (a daemon's 502)."""

    def __init__(self, model: str = "scripted-model", options=None) -> None:
        super().__init__(model, options, default=Step(error=UpstreamConnectionError("no such model")))


register_provider("probe-evict-test", _Junk)


def _probed(router: Router) -> set[str]:
    return set(router._probes._probes)


async def test_an_evicted_direct_group_leaves_no_probe_behind():
    router = Router(Config(router=RouterConfig(max_direct_models=2, retry=Retry(attempts=0))))
    for i in range(10):
        with pytest.raises(UpstreamConnectionError):
            await router.chat(
                {"model": f"probe-evict-test/m{i}", "messages": [{"role": "user", "content": "hi"}]}
            )
        await router.readiness()
        assert len(router.groups) <= 2
        assert _probed(router) == {d.id for d in router.deployments}
    assert _probed(router) == {"probe-evict-test/m8", "probe-evict-test/m9"}
    await router.aclose()


async def test_forget_drops_only_the_names_given():
    probes = SharedProbes()

    async def check() -> dict:
        return {"reachable": True}

    for name in ("a", "b", "c"):
        await probes.result(name, check)
    probes.forget(["a", "c", "never-probed"])
    assert set(probes._probes) == {"b"}
