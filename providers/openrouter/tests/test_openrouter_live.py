"""Opt-in: the provider against OpenRouter itself, with a real key (spends a fraction of a cent).

Run with ``OPENROUTER_API_KEY=sk-or-... pytest -m live_openrouter providers/openrouter``;
the model is ``LLMROUTER_OPENROUTER_LIVE_MODEL`` (default: a small, cheap one).
See docs/providers/openrouter.md.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from llmrouter_openrouter import OpenRouterOptions, OpenRouterProvider, fetch_prices

from llmrouter.errors import AuthenticationError
from llmrouter.types import decode_chat_request

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.live_openrouter,
    pytest.mark.skipif(
        not os.environ.get("OPENROUTER_API_KEY"), reason="set OPENROUTER_API_KEY to talk to OpenRouter"
    ),
]

MODEL = os.environ.get("LLMROUTER_OPENROUTER_LIVE_MODEL", "meta-llama/llama-3.2-1b-instruct")


@pytest.fixture
async def live() -> AsyncIterator[OpenRouterProvider]:
    async with OpenRouterProvider(MODEL, OpenRouterOptions(x_title="llmrouter live tests")) as provider:
        yield provider


def ask(text: str, **fields: object):
    return decode_chat_request({"model": MODEL, "messages": [{"role": "user", "content": text}], **fields})


async def test_live_chat_reports_cost(live: OpenRouterProvider) -> None:
    response = await live.chat(ask("Reply with the single word: pong", max_tokens=8, temperature=0))
    assert response.choices[0].message.content
    assert response.usage is not None and response.usage.cost is not None and response.usage.cost >= 0


async def test_live_stream_ends_with_cost(live: OpenRouterProvider) -> None:
    chunks = [c async for c in live.stream(ask("Count from 1 to 5.", max_tokens=24))]
    assert chunks[-1].usage is not None and chunks[-1].usage.cost is not None


async def test_live_health_and_prices(live: OpenRouterProvider) -> None:
    assert (await live.health()).ok
    prices = await fetch_prices()
    assert len(prices) > 10 and all(p.input >= 0 and p.output >= 0 for p in prices.values())


async def test_live_bad_key() -> None:
    async with OpenRouterProvider(MODEL, OpenRouterOptions(api_key="sk-or-v1-invalid")) as provider:
        with pytest.raises(AuthenticationError):
            await provider.chat(ask("hi", max_tokens=1))
