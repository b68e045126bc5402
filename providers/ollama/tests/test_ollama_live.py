"""Opt-in: the same provider against a real Ollama daemon.

Run with ``LLMROUTER_LIVE_OLLAMA=1 pytest -m live_ollama providers/ollama`` (the daemon
at ``OLLAMA_HOST``; the model in ``LLMROUTER_OLLAMA_MODEL``, else the first one pulled).
See docs/providers/ollama.md.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import anyio
import pytest
from llmrouter_ollama import OllamaProvider, probe

from llmrouter.errors import ModelNotFoundError
from llmrouter.types import decode_chat_request

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.live_ollama,
    pytest.mark.skipif(
        os.environ.get("LLMROUTER_LIVE_OLLAMA") != "1",
        reason="set LLMROUTER_LIVE_OLLAMA=1 to talk to a real daemon",
    ),
]


@pytest.fixture
async def live() -> AsyncIterator[OllamaProvider]:
    found = await probe(probe_timeout=3.0)
    if found.error is not None:
        pytest.fail(found.note)
    model = os.environ.get("LLMROUTER_OLLAMA_MODEL") or (found.models[0] if found.models else None)
    if model is None:
        pytest.skip(f"no model pulled at {found.host}")
    async with OllamaProvider(model) as provider:
        yield provider


def ask(text: str, **fields: object):
    return decode_chat_request({"model": "live", "messages": [{"role": "user", "content": text}], **fields})


async def test_live_chat_reports_usage(live: OllamaProvider) -> None:
    response = await live.chat(ask("Reply with the single word: pong", max_tokens=16, temperature=0))
    assert response.choices[0].message.content
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage is not None and response.usage.completion_tokens > 0


async def test_live_stream_ends_with_usage(live: OllamaProvider) -> None:
    chunks = [c async for c in live.stream(ask("Count from 1 to 5.", max_tokens=32))]
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


async def test_live_length_limit(live: OllamaProvider) -> None:
    response = await live.chat(ask("Write a long story about a lighthouse.", max_tokens=5))
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens <= 5


async def test_live_cancel_mid_stream(live: OllamaProvider) -> None:
    received = 0
    with anyio.move_on_after(5):
        async for _chunk in live.stream(ask("Write a very long essay about rivers.", max_tokens=2000)):
            received += 1
            if received == 3:
                break
    assert received == 3


async def test_live_missing_model() -> None:
    async with OllamaProvider("llmrouter-no-such-model:never") as provider:
        with pytest.raises(ModelNotFoundError, match="ollama pull"):
            await provider.chat(ask("hi"))
