"""The shared provider conformance suite, on both tiny models."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from llmrouter_transformers import TransformersProvider

from llmrouter.testing.conformance import ProviderConformance


class TestTransformersConformance(ProviderConformance):
    supports_completions = True
    deterministic = True
    # The tiny models decode thousands of tokens a second: make the slow request long
    # enough that it is still running when the suite cancels it.
    slow_max_tokens = 1500
    cancel_after_s = 0.05

    @pytest.fixture
    async def provider(self, tiny_provider: TransformersProvider) -> AsyncIterator[TransformersProvider]:
        yield tiny_provider
