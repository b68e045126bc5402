"""Zero-config discovery: concurrent, bounded, and honest about what was not found."""

from __future__ import annotations

import anyio
import pytest

from llmrouter.config import Config, Deployment, ModelGroup, parse_config
from llmrouter.discovery import describe_config, discover_models, resolve_config
from llmrouter.registry import KNOWN_PROVIDERS, register_provider
from llmrouter.testing.scripted import ScriptedProvider


def group(name: str, provider: str, *aliases: str) -> ModelGroup:
    return ModelGroup(
        name=name, aliases=list(aliases), deployments=[Deployment(provider=provider, model=name)]
    )


class FindsTwo(ScriptedProvider):
    name = "test-finds-two"

    @classmethod
    async def discover(cls) -> list[ModelGroup]:
        return [group("alpha", cls.name), group("beta", cls.name, "b")]

    @classmethod
    def discovery_note(cls) -> str:
        return "test-finds-two: alpha, beta (local daemon)"


class FindsDuplicate(ScriptedProvider):
    name = "test-duplicate"

    @classmethod
    async def discover(cls) -> list[ModelGroup]:
        return [group("b", cls.name), group("gamma", cls.name)]


class Raises(ScriptedProvider):
    name = "test-raises"

    @classmethod
    async def discover(cls) -> list[ModelGroup]:
        raise OSError("probe exploded")


class Hangs(ScriptedProvider):
    name = "test-hangs"

    @classmethod
    async def discover(cls) -> list[ModelGroup]:
        await anyio.sleep(30)
        return [group("never", cls.name)]


class FindsNothing(ScriptedProvider):
    name = "test-nothing"


for _cls in (FindsTwo, FindsDuplicate, Raises, Hangs, FindsNothing):
    register_provider(_cls.name, _cls)

FAKES = ["test-finds-two", "test-duplicate", "test-raises", "test-hangs", "test-nothing"]


@pytest.mark.anyio
async def test_discovery_collects_groups_and_explains_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        KNOWN_PROVIDERS, "imaginary", "llmrouter-imaginary (pip install 'llmrouter[imaginary]')"
    )
    with anyio.fail_after(5):  # the hanging provider is cut off by the deadline, not awaited
        report = await discover_models(FAKES, deadline_s=0.3)
    assert [g.name for g in report.groups] == ["alpha", "beta", "gamma"]
    lines = report.lines
    assert "test-finds-two: alpha, beta (local daemon)" in lines
    assert "test-duplicate: skipped 'b', the name is already taken" in lines
    assert "test-raises: discovery failed (OSError: probe exploded)" in lines
    assert "test-hangs: discovery timed out after 0.3s" in lines
    assert "test-nothing: nothing found" in lines
    assert (
        "imaginary: not installed (install llmrouter-imaginary (pip install 'llmrouter[imaginary]'))" in lines
    )


@pytest.mark.anyio
async def test_discovery_runs_concurrently() -> None:
    # Each probe waits until all of them have started: run one after another, every
    # probe would hit its deadline instead of finding its model.
    started: list[str] = []
    everyone_started = anyio.Event()

    def barrier_provider(model: str) -> type[ScriptedProvider]:
        class Barrier(ScriptedProvider):
            @classmethod
            async def discover(cls) -> list[ModelGroup]:
                started.append(model)
                if len(started) == 3:
                    everyone_started.set()
                await everyone_started.wait()
                return [group(model, "barrier")]

        return Barrier

    names = [f"test-barrier-{index}" for index in range(3)]
    for name in names:
        register_provider(name, barrier_provider(name))
    report = await discover_models(names, deadline_s=10)
    assert sorted(g.name for g in report.groups) == names


@pytest.mark.anyio
async def test_resolve_config_keeps_configured_models_and_turns_discovery_off() -> None:
    configured = parse_config(
        {
            "models": [
                {
                    "name": "x",
                    "deployments": [
                        {"provider": "remote", "model": "x", "base_url": "http://127.0.0.1:1/v1"}
                    ],
                }
            ]
        },
        env={},
    )
    same, notes = await resolve_config(configured)
    assert same is configured and notes == []
    off, notes = await resolve_config(Config(discover=False))
    assert off.models == [] and notes == []


@pytest.mark.anyio
async def test_unknown_provider_name_is_reported() -> None:
    report = await discover_models(["test-no-such-provider"])
    assert report.lines[0].startswith("test-no-such-provider: cannot load (unknown provider")


def test_describe_config() -> None:
    config = Config(
        models=[
            group("alpha", "p", "a1"),
            ModelGroup(
                name="pair",
                deployments=[
                    Deployment(provider="p", model="m1"),
                    Deployment(provider="q", model="m2", id="q-main"),
                ],
            ),
        ]
    )
    assert describe_config(config) == ["alpha (aliases: a1) -> p/alpha", "pair -> p/m1, q-main"]
