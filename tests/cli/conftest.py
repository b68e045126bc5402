"""Fixtures for CLI tests: ``llmrouter serve`` as a real subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, base_url: str, model: str = "mock-gpt", **extra: Any) -> Path:
    """The minimal config of issue 2 (one remote deployment), plus ``extra`` sections."""
    data = {
        "models": [
            {
                "name": model,
                "deployments": [{"provider": "remote", "model": "mock-gpt", "base_url": base_url}],
            }
        ],
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def llmrouter_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmrouter.cli", *args]


class ServeProcess:
    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url
        self.output = ""


@contextmanager
def llmrouter_serve(config: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[ServeProcess]:
    """``llmrouter serve --config CONFIG`` on a free port, run in the config's folder; waits for ``/health``."""
    port = free_port()
    process = subprocess.Popen(
        llmrouter_command("serve", "--config", str(config), "--port", str(port), "--no-access-log", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=config.parent,  # the default SQLite ledger and cache files land next to the config
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    served = ServeProcess(process, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"llmrouter serve exited: {process.stdout.read() if process.stdout else ''}"
                )
            try:
                if httpx.get(f"{served.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llmrouter serve did not become healthy")
            time.sleep(0.1)
        yield served
    finally:
        process.terminate()
        try:
            out, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        served.output = out


@pytest.fixture
def serve() -> Any:
    """``serve(config_path, *extra_args)``: a context manager running ``llmrouter serve``."""
    return llmrouter_serve


@pytest.fixture
def make_config() -> Any:
    """``make_config(path, base_url, model=..., **sections)`` writes a YAML config."""
    return write_config


@pytest.fixture
def cli_command() -> Any:
    """``cli_command(*args)``: the argv that runs the llmrouter CLI with this interpreter."""
    return llmrouter_command
