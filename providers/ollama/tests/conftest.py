"""Fixtures for the Ollama provider tests: one fake daemon per session, reset per test."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# --import-mode=importlib does not put test folders on sys.path; the fake lives here.
sys.path.insert(0, str(Path(__file__).parent))

from fake_ollama import FakeOllama, ServerThread


@pytest.fixture(scope="session")
def _fake_ollama_server() -> Iterator[tuple[FakeOllama, str]]:
    fake = FakeOllama()
    server = ServerThread(fake)
    url = server.start()
    yield fake, url
    server.stop()


@pytest.fixture
def fake_ollama(_fake_ollama_server: tuple[FakeOllama, str]) -> FakeOllama:
    fake, _ = _fake_ollama_server
    fake.reset()
    return fake


@pytest.fixture
def ollama_url(_fake_ollama_server: tuple[FakeOllama, str], fake_ollama: FakeOllama) -> str:
    return _fake_ollama_server[1]


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
