"""Zero-config discovery of an Ollama daemon (OLLAMA_HOST), against the fake daemon."""

from __future__ import annotations

import pytest
from fake_ollama import FakeOllama
from llmrouter_ollama import OllamaProvider, resolve_host

from llmrouter.config import Config
from llmrouter.discovery import discover_models

pytestmark = pytest.mark.anyio


async def test_discover_registers_every_pulled_model(
    ollama_url: str, fake_ollama: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", ollama_url)
    groups = await OllamaProvider.discover()
    by_name = {group.name: group for group in groups}
    assert set(by_name) == {"ollama/llama3.2", "ollama/qwen2.5:0.5b"}
    llama = by_name["ollama/llama3.2"]
    assert llama.aliases == ["llama3.2", "llama3.2:latest", "ollama/llama3.2:latest"]
    (deployment,) = llama.deployments
    assert (deployment.provider, deployment.model, deployment.options) == (
        "ollama",
        "llama3.2:latest",
        {"host": ollama_url},
    )
    assert by_name["ollama/qwen2.5:0.5b"].aliases == ["qwen2.5:0.5b"]
    note = OllamaProvider.discovery_note()
    assert note.startswith(f"ollama: 2 model(s) at {ollama_url}") and "llama3.2:latest" in note
    # The groups are valid config: they decode and the names do not clash.
    Config(models=groups)


async def test_discovered_deployment_serves_chat(ollama_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", ollama_url)
    (group, *_) = await OllamaProvider.discover()
    deployment = group.deployments[0]
    async with OllamaProvider.from_config(deployment.model, deployment.options) as provider:
        from llmrouter.types import decode_chat_request

        response = await provider.chat(
            decode_chat_request({"model": group.name, "messages": [{"role": "user", "content": "hi"}]})
        )
    assert response.choices[0].message.content


async def test_no_daemon_finds_nothing_and_says_so(dead_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", dead_url)
    assert await OllamaProvider.discover() == []
    note = OllamaProvider.discovery_note()
    assert note.startswith(f"ollama: no daemon at {dead_url}") and "OLLAMA_HOST" in note


async def test_a_host_name_that_does_not_resolve_is_said_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    # As in compose without the ollama profile: OLLAMA_HOST names a service that is not there.
    monkeypatch.setenv("OLLAMA_HOST", "http://ollama.invalid:11434")
    assert await OllamaProvider.discover() == []
    note = OllamaProvider.discovery_note()
    assert "(cannot resolve its host name)" in note and "refused" not in note


async def test_rediscover_sees_newly_pulled_models(
    ollama_url: str, fake_ollama: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", ollama_url)
    first = await OllamaProvider.discover()
    fake_ollama.models.append("phi4-mini:latest")
    try:
        # Within min_interval the last probe is reused; with 0 it probes again.
        assert len(await OllamaProvider.rediscover(min_interval=60)) == len(first)
        again = await OllamaProvider.rediscover(min_interval=0)
        assert "ollama/phi4-mini" in {group.name for group in again}
    finally:
        fake_ollama.models.remove("phi4-mini:latest")


async def test_core_discovery_reports_the_daemon(ollama_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", ollama_url)
    report = await discover_models(["ollama"])
    assert {group.name for group in report.groups} == {"ollama/llama3.2", "ollama/qwen2.5:0.5b"}
    assert report.lines[0].startswith("ollama: 2 model(s)")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "http://127.0.0.1:11434"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        (":11435", "http://127.0.0.1:11435"),
        ("gpu-box:8080", "http://gpu-box:8080"),
        ("https://ollama.example.com", "https://ollama.example.com"),
        ("http://[::1]:11434/", "http://[::1]:11434"),
    ],
)
def test_ollama_host_forms(value: str | None, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert resolve_host(value) == expected


async def test_zero_config_router_serves_discovered_models(
    ollama_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmrouter.router import Router

    monkeypatch.setenv("OLLAMA_HOST", ollama_url)
    report = await discover_models(["ollama"])  # only this provider: no other probes in this test
    async with Router.from_config(Config(models=report.groups, discover=False)) as router:
        for name in ("llama3.2", "ollama/llama3.2", "qwen2.5:0.5b"):
            response = await router.chat({"model": name, "messages": [{"role": "user", "content": "hi"}]})
            assert response.choices[0].message.content
