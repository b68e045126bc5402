"""OllamaProvider passes the provider conformance suite against the fake daemon."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fake_ollama import FakeOllama
from llmrouter_ollama import OllamaOptions, OllamaProvider

from llmrouter.testing.conformance import ProviderConformance

STORY = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 30


class TestOllamaConformance(ProviderConformance):
    supports_completions = True
    deterministic = True

    @pytest.fixture
    async def provider(self, ollama_url: str, fake_ollama: FakeOllama) -> AsyncIterator[OllamaProvider]:
        # 5 ms a token: 16-token requests stay quick; the 256-token one used by the
        # cancellation tests takes over a second, so it really is cut short.
        fake_ollama.reply = STORY
        fake_ollama.token_delay = 0.005
        async with OllamaProvider("qwen2.5:0.5b", OllamaOptions(host=ollama_url)) as provider:
            yield provider
