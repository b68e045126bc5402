"""``llmrouter serve`` as a subprocess: the issue's minimal config, workers, and a chain of routers."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmrouter.testing.upstream import FakeUpstream

from .conftest import free_port

MESSAGES: list[Any] = [{"role": "user", "content": "ping"}]


def test_serve_minimal_config(tmp_path: Path, fake: FakeUpstream, serve: Any, make_config: Any) -> None:
    config = make_config(tmp_path / "llmrouter.yaml", fake.base_url)
    with serve(config) as server:
        sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        reply = sdk.chat.completions.create(model="mock-gpt", messages=MESSAGES)
        assert reply.choices[0].message.content == "Echo: ping"
        stream = sdk.chat.completions.create(model="mock-gpt", messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Echo: ping"
        assert httpx.get(f"{server.url}/ready", timeout=5).json()["ready"] is True
    assert f"config: {config}" in server.output
    assert "models: 1 group(s), 1 deployment(s)" in server.output
    assert "mock-gpt -> remote/mock-gpt" in server.output
    assert f"listening on {server.url}" in server.output


def test_serve_with_two_workers(tmp_path: Path, fake: FakeUpstream, serve: Any, make_config: Any) -> None:
    config = make_config(tmp_path / "llmrouter.yaml", fake.base_url, telemetry={"json_logs": False})
    with serve(config, "--workers", "2") as server:
        for _ in range(12):  # a connection each: the workers take turns accepting them
            sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            assert sdk.chat.completions.create(model="mock-gpt", messages=MESSAGES).choices[0].message.content
            sdk.close()
        # Every scrape shows both workers' series, whichever worker answers it (the
        # other worker's snapshot is at most a second old).
        deadline = time.monotonic() + 10
        while sum(_chat_counts(server.url).values()) < 12:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        for _ in range(10):
            assert sum(_chat_counts(server.url).values()) == 12
            assert len(_workers(server.url)) == 2
    assert len(fake.generation_requests()) == 12
    # Plain logs in each worker too (before: only with json_logs; a worker logged nothing).
    assert server.output.count("INFO llmrouter.telemetry: telemetry started") == 2


def _scrape(url: str) -> list[Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text))


def _chat_counts(url: str) -> dict[str, float]:
    """Chat requests by worker, from one scrape."""
    return {
        sample.labels["worker"]: sample.value
        for family in _scrape(url)
        for sample in family.samples
        if sample.name == "http_server_request_duration_seconds_count"
        and sample.labels["http_route"] == "/v1/chat/completions"
    }


def _workers(url: str) -> set[str]:
    return {sample.labels["worker"] for family in _scrape(url) for sample in family.samples}


def test_chain_of_two_routers(tmp_path: Path, fake: FakeUpstream, serve: Any, make_config: Any) -> None:
    # client -> llmrouter A -> remote provider -> llmrouter B -> fake upstream
    no_retry = {"retry": {"attempts": 0}}  # so that one upstream 429 reaches the client
    config_b = make_config(tmp_path / "b.yaml", fake.base_url, router=no_retry)
    with serve(config_b) as node_b:
        config_a = make_config(tmp_path / "a.yaml", f"{node_b.url}/v1", model="chained", router=no_retry)
        with serve(config_a) as node_a:
            sdk = openai.OpenAI(base_url=f"{node_a.url}/v1", api_key="unused", max_retries=0)
            raw = sdk.chat.completions.with_raw_response.create(
                model="chained", messages=MESSAGES, extra_headers={"x-request-id": "chain-1"}
            )
            assert raw.parse().choices[0].message.content == "Echo: ping"
            assert raw.headers["x-request-id"] == "chain-1"
            stream = sdk.chat.completions.create(
                model="chained", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
            chunks = list(stream)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: ping"
            assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0

            fake.enqueue("rate_limit")
            try:
                sdk.chat.completions.create(model="chained", messages=MESSAGES)
            except openai.RateLimitError as exc:
                assert exc.response.headers.get("retry-after")
            else:
                raise AssertionError("an upstream 429 must reach the client through both routers")
    # Node B saw the upstream model name; the fake saw every generation request.
    assert {r.json["model"] for r in fake.generation_requests()} == {"mock-gpt"}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_start_up_that_fails_says_why_in_one_line_and_exits_3(
    tmp_path: Path, fake: FakeUpstream, make_config: Any, cli_command: Any, workers: str
) -> None:
    # Nothing listens on port 1: the accounting database refuses the connection. Before,
    # uvicorn logged a hundred-line traceback, and with two workers exited 0.
    unreachable = {"database": {"url": "postgresql+asyncpg://llmrouter@127.0.0.1:1/llmrouter"}}
    config = make_config(tmp_path / "llmrouter.yaml", fake.base_url, accounting=unreachable)
    done = subprocess.run(
        cli_command("serve", "--config", str(config), "--port", str(free_port()), "--workers", workers),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 3, done.stderr
    assert "accounting failed to start: ConnectionRefusedError" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_request_cut_by_shutdown_is_billed_and_recorded(
    tmp_path: Path, serve: Any, make_config: Any
) -> None:
    # SIGTERM with a stream in flight: after server.drain_seconds uvicorn cancels it and
    # shuts the app down at once; the ledger writer closed while the request was still
    # being billed, and its row was lost ("ledger writer is closed").
    with FakeUpstream(models=["mock-gpt"], chunks=100, delay_ms=50) as slow:
        config = make_config(tmp_path / "llmrouter.yaml", slow.base_url, server={"drain_seconds": 0.5})
        with serve(config) as server, httpx.Client(base_url=server.url, timeout=30) as client:
            body = {"model": "mock-gpt", "messages": MESSAGES, "stream": True}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                server.process.terminate()
                events = [line for line in lines if line.startswith("data:")]
            # The client is told why its stream ends short (it used to be cut mid-body).
            assert events[-1] == "data: [DONE]" and len(events) < 100
            assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "server_shutting_down"
            # uvicorn raises the signal again once it has shut down, as the exit status.
            assert server.process.wait(timeout=20) == -signal.SIGTERM
    assert "ledger writer is closed" not in server.output
    assert "Traceback" not in server.output  # before: uvicorn logged the cancellation, ~40 lines
    with sqlite3.connect(tmp_path / "llmrouter.db") as db:
        rows = db.execute("SELECT status, completion_tokens FROM llmr_ledger").fetchall()
    assert len(rows) == 1 and rows[0][0] == "cancelled" and rows[0][1] > 0, rows


def test_a_stopping_service_with_workers_refuses_new_connections_at_once(
    tmp_path: Path, serve: Any, make_config: Any
) -> None:
    # The supervisor kept its copy of the listening socket open through the drain: new
    # connections were accepted by the kernel, served by nobody, and reset when it exited
    # (10 s here), where one process refuses them at once, and a load balancer needs the
    # refusal to fail over.
    with FakeUpstream(models=["mock-gpt"], chunks=200, delay_ms=50) as slow:  # 10 s streams
        config = make_config(tmp_path / "llmrouter.yaml", slow.base_url, server={"drain_seconds": 20})
        with (
            serve(config, "--workers", "2") as server,
            httpx.Client(base_url=server.url, timeout=30) as client,
        ):
            body = {"model": "mock-gpt", "messages": MESSAGES, "stream": True}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                server.process.terminate()
                # Refused once the supervisor has the signal (a moment on a loaded machine),
                # well before the stream in flight ends (10 s); before, every try was
                # accepted and left hanging until the drain ended.
                deadline = time.monotonic() + 5
                while True:
                    try:
                        httpx.get(f"{server.url}/health", timeout=0.5)
                    except httpx.ConnectError:
                        break
                    except httpx.TransportError:
                        pass  # accepted, and never answered
                    assert time.monotonic() < deadline, "new connections still accepted"
                    time.sleep(0.1)
                # The stream in flight still ends well: drained, not cut.
                events = [line for line in lines if line.startswith("data:")]
                assert events[-1] == "data: [DONE]"
            server.process.wait(timeout=30)


def test_a_json_request_cut_by_shutdown_is_a_503_to_retry(
    tmp_path: Path, serve: Any, make_config: Any
) -> None:
    # It was uvicorn's plain-text "500 Internal Server Error".
    with FakeUpstream(models=["mock-gpt"], chunks=100, delay_ms=50) as slow:  # a 5 s answer
        config = make_config(tmp_path / "llmrouter.yaml", slow.base_url, server={"drain_seconds": 0.5})
        with serve(config) as server:
            threading.Timer(0.5, server.process.terminate).start()
            body = {"model": "mock-gpt", "messages": MESSAGES}
            response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
            assert server.process.wait(timeout=20) == -signal.SIGTERM
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "server_shutting_down"
    assert "Exception in ASGI application" not in server.output
    with sqlite3.connect(tmp_path / "llmrouter.db") as db:
        assert db.execute("SELECT status FROM llmr_ledger").fetchall() == [("cancelled",)]


def test_with_json_logs_every_line_of_the_output_is_json(
    tmp_path: Path, fake: FakeUpstream, serve: Any, make_config: Any
) -> None:
    # stdout is a pipe here, as under a container runtime or a supervisor: the start-up
    # summary is log records too (at a terminal it stays plain lines).
    config = make_config(tmp_path / "llmrouter.yaml", fake.base_url, telemetry={"json_logs": True})
    with serve(config) as server:
        body = {"model": "mock-gpt", "messages": MESSAGES}
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=10).status_code == 200
    records = [json.loads(line) for line in server.output.splitlines() if line.strip()]
    summary = [r["message"] for r in records if r["logger"] == "llmrouter.serve"]
    assert "mock-gpt -> remote/mock-gpt" in summary
    assert any(line.startswith("listening on http://") for line in summary)
