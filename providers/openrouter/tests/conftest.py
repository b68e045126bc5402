"""Fixtures for the OpenRouter provider tests: one fake OpenRouter per session, reset per test."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# --import-mode=importlib does not put test folders on sys.path; the fake lives here.
sys.path.insert(0, str(Path(__file__).parent))

from fake_openrouter import FakeOpenRouter, ServerThread


@pytest.fixture(scope="session")
def _fake_openrouter_server() -> Iterator[tuple[FakeOpenRouter, str]]:
    fake = FakeOpenRouter()
    server = ServerThread(fake)
    url = server.start()
    yield fake, url
    server.stop()


@pytest.fixture
def fake_openrouter(_fake_openrouter_server: tuple[FakeOpenRouter, str]) -> FakeOpenRouter:
    fake, _ = _fake_openrouter_server
    fake.reset()
    return fake


@pytest.fixture
def openrouter_url(
    _fake_openrouter_server: tuple[FakeOpenRouter, str], fake_openrouter: FakeOpenRouter
) -> str:
    """The fake's API root (what ``base_url`` points at)."""
    return f"{_fake_openrouter_server[1]}/api/v1"
