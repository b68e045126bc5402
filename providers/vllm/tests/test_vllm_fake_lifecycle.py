"""The vllm provider's start and close, on a scripted fake engine (no vLLM needed)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from fake_vllm_engine import CharTokenizer, FakeBackend, FakeEngine

from llmrouter.errors import ConfigError, ProviderNotInstalledError, UpstreamUnavailableError
from llmrouter.types import decode_chat_request

pytest.importorskip(
    "llmrouter_vllm", reason="llmrouter-vllm is not installed here: pip install --no-deps -e providers/vllm"
)


pytestmark = pytest.mark.anyio

MakeProvider = Callable[[FakeBackend], Any]


def hello() -> Any:
    return decode_chat_request({"model": "m", "messages": [{"role": "user", "content": "hello"}]})


async def test_a_start_error_is_its_cause_not_an_exception_group(fake_vllm: MakeProvider) -> None:
    # The build ran in a task group (for the progress lines), which wrapped its error.
    error = ConfigError("vllm: unknown engine_args ['max_num_seq'] (see vllm.AsyncEngineArgs)")
    provider = fake_vllm(FakeBackend(build_error=error))
    with pytest.raises(ConfigError, match="max_num_seq"):
        await provider.start()
    health = await provider.health()
    assert not health.ok and provider.state == "failed"
    assert "ConfigError: vllm: unknown engine_args" in health.detail
    assert "ExceptionGroup" not in health.detail


async def test_vllm_missing_is_a_not_installed_error_with_its_install_hint(
    fake_vllm: MakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = fake_vllm(FakeBackend())
    monkeypatch.setitem(sys.modules, "llmrouter_vllm._engine", None)  # its import fails
    with pytest.raises(ProviderNotInstalledError, match="pip install"):
        await provider.start()
    assert "ProviderNotInstalledError: vllm is not installed" in (await provider.health()).detail


async def test_a_start_cancelled_during_the_build_leaves_the_built_engine_running(
    fake_vllm: MakeProvider,
) -> None:
    # The first request starts the deployment lazily, and its client leaves mid-build.
    backend = FakeBackend(hold_build=True)
    provider = fake_vllm(backend)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(provider.start)
            await anyio.to_thread.run_sync(backend.building.wait, 10.0)
            tg.cancel_scope.cancel()
            backend.release_build.set()
        assert provider.state == "running"
        await provider.start()  # the router's next request: returns at once
        assert (await provider.health()).ok
        response = await provider.chat(hello())
        assert response.choices[0].message.content == "hi"
    finally:
        backend.release_build.set()
        await provider.aclose()
    assert backend.engine.shut_down


async def test_a_request_whose_engine_closed_while_its_prompt_rendered_is_a_503(
    fake_vllm: MakeProvider,
) -> None:
    engine = FakeEngine()
    engine.tokenizer = CharTokenizer(hold_render=True)
    provider = fake_vllm(FakeBackend(engine))
    await provider.start()
    caught: list[BaseException] = []

    async def ask() -> None:
        try:
            await provider.chat(hello())
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            caught.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            await anyio.to_thread.run_sync(engine.tokenizer.rendering.wait, 10.0)
            await provider.aclose()  # shutdown or eviction, while the prompt renders
            engine.tokenizer.release_render.set()
    finally:
        engine.tokenizer.release_render.set()
    assert len(caught) == 1 and isinstance(caught[0], UpstreamUnavailableError), caught
    assert caught[0].http_status == 503
