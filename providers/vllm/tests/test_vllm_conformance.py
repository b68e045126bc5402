"""The shared provider conformance suite, run against a real vLLM engine (tiny Llama)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib.util import find_spec
from typing import Any

import pytest

from llmrouter.provider import Provider
from llmrouter.testing.conformance import ProviderConformance
from llmrouter.types import ChatRequest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        find_spec("vllm") is None, reason="vLLM is not installed here (scripts/setup-vllm-env)"
    ),
]


class TestVLLMConformance(ProviderConformance):
    supports_completions = True
    deterministic = True
    # Fits the fixture's 512-token context with the prompt; takes seconds to decode.
    slow_max_tokens = 450

    @pytest.fixture
    async def provider(self, tiny_vllm: Any) -> AsyncIterator[Any]:
        yield tiny_vllm

    def slow_chat_request(self, provider: Provider[Any], **fields: Any) -> ChatRequest:
        # Random weights may pick EOS early; the request that gets cancelled must run long.
        return self.chat_request(provider, max_tokens=self.slow_max_tokens, ignore_eos=True, **fields)
