"""OpenRouterProvider passes the provider conformance suite against the fake OpenRouter."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fake_openrouter import API_KEY, FakeOpenRouter
from llmrouter_openrouter import OpenRouterOptions, OpenRouterProvider

from llmrouter.testing.conformance import ProviderConformance

STORY = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 30


class TestOpenRouterConformance(ProviderConformance):
    supports_completions = True
    deterministic = True

    @pytest.fixture
    async def provider(
        self, openrouter_url: str, fake_openrouter: FakeOpenRouter
    ) -> AsyncIterator[OpenRouterProvider]:
        # 5 ms a token: the 256-token request of the cancellation tests takes over a second.
        fake_openrouter.reply = STORY
        fake_openrouter.token_delay = 0.005
        options = OpenRouterOptions(base_url=openrouter_url, api_key=API_KEY)
        async with OpenRouterProvider("openai/gpt-4o-mini", options) as provider:
            yield provider
