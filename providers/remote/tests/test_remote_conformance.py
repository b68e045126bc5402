"""RemoteProvider passes the provider conformance suite against the fake upstream."""

from collections.abc import AsyncIterator, Iterator

import pytest
from llmrouter_remote import RemoteProvider

from llmrouter.testing.conformance import ProviderConformance
from llmrouter.testing.upstream import FakeUpstream

STORY = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 30


@pytest.fixture(scope="module")
def conformance_upstream() -> Iterator[FakeUpstream]:
    # 5 ms a token: ordinary requests (16 tokens) stay quick, the 256-token request used by
    # the cancellation tests takes over a second, so it is really cut short.
    with FakeUpstream(reply=STORY, delay_ms=5, models=["fake-model", "other-model"]) as upstream:
        yield upstream


class TestRemoteConformance(ProviderConformance):
    supports_completions = True
    deterministic = True

    @pytest.fixture
    async def provider(self, conformance_upstream: FakeUpstream) -> AsyncIterator[RemoteProvider]:
        async with RemoteProvider("fake-model", base_url=conformance_upstream.base_url) as provider:
            yield provider
