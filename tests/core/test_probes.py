"""Readiness probes are shared: one upstream health check per deployment at a time, reused
for a second, so that calls to the keyless ``/ready`` are not multiplied upstream."""

from __future__ import annotations

import anyio
import pytest

from llmrouter import Router
from llmrouter.provider import Health
from llmrouter.testing.scripted import ScriptedProvider

pytestmark = pytest.mark.anyio


class Probed(ScriptedProvider):
    def __init__(self, *, delay: float = 0.05) -> None:
        super().__init__()
        self.checks = 0
        self.delay = delay

    async def health(self) -> Health:
        self.checks += 1
        await anyio.sleep(self.delay)
        return Health(ok=True, detail=f"check {self.checks}")


async def test_concurrent_calls_share_one_probe_and_reuse_it_for_a_second(monkeypatch):
    provider = Probed()
    router = Router()
    router.add_deployment("g", provider)
    reports: list[dict] = []

    async def ready() -> None:
        reports.append(await router.readiness())

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(ready)
    assert provider.checks == 1, "fifty callers, one upstream check"
    assert {r["deployments"][0]["detail"] for r in reports} == {"check 1"}
    await router.readiness()
    assert provider.checks == 1, "reused within a second of its end"
    monkeypatch.setattr("llmrouter.probes.PROBE_TTL_S", 0.0)  # as if a second had passed
    assert (await router.readiness())["deployments"][0]["detail"] == "check 2"


async def test_a_caller_leaving_mid_probe_does_not_leave_the_others_without_one():
    provider = Probed(delay=0.2)
    router = Router()
    router.add_deployment("g", provider)
    with anyio.move_on_after(0.05):
        await router.readiness()  # the prober leaves
    report = await router.readiness()
    assert report["deployments"][0]["reachable"] is True and provider.checks == 2
