"""The scripts in examples/, run as a user runs them: against ``llmrouter serve`` (here in
front of a fake upstream, priced so that costs show), and the library one in process
with the embedded model (slow)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmrouter.testing.upstream import FakeUpstream

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODEL = "mock-gpt"


@pytest.fixture(scope="module")
def slow_upstream() -> Iterator[FakeUpstream]:
    # Slow enough for identical requests to overlap (coalescing) and for a client to
    # leave a stream mid-way (cancellation): 40 chunks 20 ms apart.
    with FakeUpstream(models=[MODEL], chunks=40, delay_ms=20, first_byte_delay_ms=150) as fake:
        yield fake


@pytest.fixture
def server(tmp_path: Path, slow_upstream: FakeUpstream, serve: Any, make_config: Any) -> Iterator[Any]:
    slow_upstream.reset()
    config = make_config(tmp_path / "llmrouter.yaml", slow_upstream.base_url)
    data = config.read_text().replace("base_url:", "price: {input: 2.0, output: 8.0}\n    base_url:")
    config.write_text(data)
    with serve(config) as running:
        running.config = config
        yield running


def run_example(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_openai_sdk(server: Any) -> None:
    out = run_example("openai_sdk.py", "--base-url", f"{server.url}/v1", "--model", MODEL)
    assert re.search(r"^reply: \S", out, re.M)
    assert f"x-llmrouter-deployment: remote/{MODEL}" in out
    assert re.search(r"^x-llmrouter-cost: 0\.\d*[1-9]", out, re.M), "priced: a cost above zero"
    assert re.search(r"^stream usage: \d+ completion tokens", out, re.M)
    assert "unknown model: 404 model_not_found" in out


def test_coalescing(server: Any, slow_upstream: FakeUpstream) -> None:
    out = run_example("coalescing.py", "--base-url", f"{server.url}/v1", "--model", MODEL, "--clients", "6")
    assert "together: 5 coalesced, 1 miss" in out
    assert "one answer for all: True" in out
    assert re.search(r"^once more: hit in", out, re.M)
    assert len(slow_upstream.generation_requests()) == 1, "six clients, one upstream call"


def test_cancel_stream(server: Any) -> None:
    out = run_example("cancel_stream.py", "--base-url", f"{server.url}/v1", "--model", MODEL)
    assert f"while streaming: remote/{MODEL} in flight 1" in out
    assert f"after leaving: remote/{MODEL} in flight 0" in out
    released = int(re.search(r"released (\d+) ms after the client left", out).group(1))  # type: ignore[union-attr]
    assert released < 700, "well before the 40 chunks (0.8 s) would have ended"


def test_keys_and_usage(server: Any, cli_command: Any) -> None:
    created = subprocess.run(
        cli_command(
            "keys", "create", "admin", "--scope", "admin", "--format", "json", "--config", str(server.config)
        ),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=server.config.parent,  # the server's SQLite file is next to its config
    )
    assert created.returncode == 0, created.stderr
    admin = json.loads(created.stdout)["secret"]
    out = run_example(
        "keys_and_usage.py",
        "--base-url",
        f"{server.url}/v1",
        "--model",
        MODEL,
        "--admin-key",
        admin,
    )
    assert re.search(r"^created key example-\w+ \(key_\w+\), budget \$1\.0 a day", out, re.M)
    assert re.search(rf"^{MODEL} ok: 3 requests, \d+ \+ \d+ tokens, 1 cache hits, \$0\.\d*[1-9]", out, re.M)
    assert re.search(r"^day budget: \$0\.\d*[1-9]\d* spent of \$1\.0", out, re.M)
    spent = re.search(r"^day budget: \$(0\.\d+) spent", out, re.M)
    assert spent and re.search(rf"^raised the budget: \${spent.group(1)} spent of \$5\.0$", out, re.M)
    assert re.search(r"^revoked key_\w+", out, re.M)
    without = subprocess.run(
        [sys.executable, str(EXAMPLES / "keys_and_usage.py"), "--base-url", f"{server.url}/v1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert without.returncode == 2 and "give an admin key" in without.stderr


@pytest.mark.slow
def test_router_library_fails_over_to_the_embedded_model() -> None:
    out = run_example("router_library.py")
    assert "attempt on remote/smollm2-135m-instruct: failed" in out
    assert "attempt on transformers/smollm2-135m-instruct: ok" in out
    assert "answered by transformers/smollm2-135m-instruct after 2 attempt(s)" in out
    assert "after leaving: transformers/smollm2-135m-instruct in flight 0" in out
