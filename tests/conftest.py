"""Fixtures shared by the service and CLI tests: a fake OpenAI-compatible upstream."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llmrouter.testing.upstream import FakeUpstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(models=["mock-gpt"], reply="Echo: {last_user}", chunks=4) as fake:
        yield fake


@pytest.fixture
def fake(upstream: FakeUpstream) -> FakeUpstream:
    upstream.reset()
    return upstream
