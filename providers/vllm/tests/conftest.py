"""Fixtures for the vLLM provider tests: one tiny-Llama engine for the whole session,
and a scripted fake engine.

Starting a vLLM engine costs 20-35 s on this CPU (import, engine-core process,
model load), so every test shares one. Those tests (marker `vllm`) run only where vLLM
is importable (the `.venv-vllm` environment from `scripts/setup-vllm-env`). The
`fake_vllm` fixture serves the provider with `fake_vllm_engine.FakeEngine` instead, so
the provider's own logic is tested in the default suite too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

# --import-mode=importlib does not put test folders on sys.path; the fake lives here.
sys.path.insert(0, str(Path(__file__).parent))

from fake_vllm_engine import FakeBackend

# Without it vLLM's CPU backend reserves most of the free memory for the KV cache
# (~6.6 GiB here) and starts slowly; 1 GiB is plenty for the tiny models.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

VLLM_MISSING = find_spec("vllm") is None
SKIP_REASON = (
    "vLLM is not installed in this environment: run scripts/setup-vllm-env and use .venv-vllm (nox -s vllm)"
)

if VLLM_MISSING and os.environ.get("LLMROUTER_REQUIRE_VLLM") == "1":
    # The CI's vLLM stage must not pass by skipping everything.
    raise RuntimeError(f"LLMROUTER_REQUIRE_VLLM=1 but {SKIP_REASON}")

TINY_MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmrouter.testing.tiny_models import build_tiny_llama

    # hidden 64 with 2 heads: head_dim 32, the smallest vLLM's CPU attention takes.
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-vllm"), hidden_size=64, num_heads=2)


@pytest.fixture(scope="session")
async def tiny_vllm(tiny_llama_dir: Path) -> AsyncIterator[object]:
    from llmrouter_vllm import VLLMOptions, VLLMProvider

    provider = VLLMProvider(
        str(tiny_llama_dir),
        VLLMOptions(
            dtype="float32",
            max_model_len=TINY_MAX_MODEL_LEN,
            enforce_eager=True,
            kv_cache_space_gib=1,
            seed=0,
        ),
    )
    async with provider:
        yield provider


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Callable[[FakeBackend], Any]:
    """Makes a (not yet started) VLLMProvider whose start() builds the backend's fake engine."""
    from llmrouter_vllm import VLLMProvider

    def provider_on(backend: FakeBackend) -> Any:
        monkeypatch.setitem(sys.modules, "llmrouter_vllm._engine", backend)
        return VLLMProvider("/models/fake")

    return provider_on
