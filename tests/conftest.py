"""Fixtures shared by the service and CLI tests: a fake OpenAI-compatible upstream."""

from __future__ import annotations

import socket
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


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung server or database)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]
