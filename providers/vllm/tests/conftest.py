"""Fixtures for the vLLM provider tests: one tiny-Llama engine for the whole session.

Starting a vLLM engine costs 20-35 s on this CPU (import, engine-core process,
model load), so every test shares one. The tests run only where vLLM is
importable (the `.venv-vllm` environment from `scripts/setup-vllm-env`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from importlib.util import find_spec
from pathlib import Path

import pytest

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
