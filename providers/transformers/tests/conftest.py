"""Fixtures for the transformers provider tests: tiny models built offline, once per session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from llmrouter_transformers import TransformersOptions, TransformersProvider

from llmrouter.testing.tiny_models import build_tiny_gpt2, build_tiny_llama


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Tiny models gain nothing from intra-op threads, and on a loaded CI machine
    OpenMP barriers between oversubscribed threads make every step ten times slower."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", max_position_embeddings=2048)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2", max_position_embeddings=2048)


@pytest.fixture(scope="session")
def tiny_llama_without_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-no-template", chat_template=None)


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request: pytest.FixtureRequest) -> Path:
    """Each tiny model in turn (rotary and absolute position embeddings)."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture
async def tiny_provider(tiny_model: Path) -> AsyncIterator[TransformersProvider]:
    provider = TransformersProvider(
        "tiny", TransformersOptions(path=str(tiny_model), device="cpu", torch_threads=1)
    )
    async with provider:
        yield provider
