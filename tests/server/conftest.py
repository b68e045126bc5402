"""Fixtures for the service tests: the fake upstream and the app served by uvicorn."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from llmrouter.testing.serve import serve_app
from llmrouter.testing.upstream import FakeUpstream


@pytest.fixture(name="serve_app")
def serve_app_fixture() -> Any:
    return serve_app


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(models=["mock-gpt"], reply="Echo: {last_user}", chunks=4) as fake:
        yield fake


@pytest.fixture
def fake(upstream: FakeUpstream) -> FakeUpstream:
    upstream.reset()
    return upstream
