"""The fake upstream itself: wire format, scripting, records, control endpoints, subprocess mode."""

import subprocess
import sys
import time

import httpx
import pytest

from llmrouter.testing.upstream import PRESETS, Behaviour, FakeUpstream

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "ping pong"}]}


def sse_data(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def test_chat_json_and_stream_with_usage() -> None:
    with FakeUpstream(reply="Echo {last_user} via {model}", chunks=3) as up:
        with httpx.Client(base_url=up.base_url) as client:
            answer = client.post("/chat/completions", json=CHAT).json()
            assert answer["choices"][0]["message"]["content"] == "Echo ping pong via fake-model"
            usage = answer["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            streamed = client.post(
                "/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}
            )
            events = sse_data(streamed.text)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    import json

    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"].get("content") for c in chunks[1:4]]
    assert len(content) == 3 and "".join(content) == "Echo ping pong via fake-model"
    assert chunks[4]["choices"][0]["finish_reason"] == "stop"
    assert chunks[5]["choices"] == [] and chunks[5]["usage"] == usage


def test_usage_chunk_only_when_asked() -> None:
    with FakeUpstream() as up, httpx.Client(base_url=up.base_url) as client:
        events = sse_data(client.post("/chat/completions", json={**CHAT, "stream": True}).text)
    assert all('"usage"' not in e for e in events)


def test_max_tokens_and_stop() -> None:
    with FakeUpstream(reply="alpha beta gamma delta") as up, httpx.Client(base_url=up.base_url) as client:
        limited = client.post("/chat/completions", json={**CHAT, "max_tokens": 2}).json()
        stopped = client.post("/chat/completions", json={**CHAT, "stop": ["gam"]}).json()
        completion = client.post("/completions", json={"model": "m", "prompt": "x", "max_tokens": 1}).json()
    assert limited["choices"][0] | {"logprobs": None} == {
        "index": 0,
        "message": {"role": "assistant", "content": "alpha beta"},
        "finish_reason": "length",
        "logprobs": None,
    }
    assert limited["usage"]["completion_tokens"] == 2
    assert stopped["choices"][0]["message"]["content"] == "alpha beta "
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == "alpha"


def test_behaviour_by_header_queue_and_model() -> None:
    with (
        FakeUpstream(model_behaviours={"busy-model": "rate_limit"}) as up,
        httpx.Client(base_url=up.base_url) as client,
    ):
        by_header = client.post("/chat/completions", json=CHAT, headers={"x-fake-behaviour": "unavailable"})
        custom = client.post(
            "/chat/completions",
            json=CHAT,
            headers={"x-fake-behaviour": '{"status": 418, "error_message": "teapot"}'},
        )
        up.enqueue("not_found", Behaviour(reply="scripted"))
        queued = [client.post("/chat/completions", json=CHAT) for _ in range(3)]
        by_model = client.post("/chat/completions", json={**CHAT, "model": "busy-model"})
        unknown = client.post("/chat/completions", json=CHAT, headers={"x-fake-behaviour": "nope"})
    assert (by_header.status_code, by_header.headers["retry-after"]) == (503, "1")
    assert custom.status_code == 418 and custom.json()["error"]["message"] == "teapot"
    assert [r.status_code for r in queued] == [404, 200, 200]
    assert queued[1].json()["choices"][0]["message"]["content"] == "scripted"
    assert by_model.status_code == 429 and by_model.json()["error"]["code"] == "rate_limit_exceeded"
    assert unknown.status_code == 400 and "nope" in unknown.json()["error"]["message"]
    assert [r.behaviour for r in up.requests[:2]] == ["unavailable", "custom"]
    assert set(PRESETS) >= {"rate_limit", "break_stream", "error_event", "no_usage", "slow_first_byte"}


def test_models_auth_and_strict_models() -> None:
    with FakeUpstream(models=["a", "b"], api_key="k", strict_models=True) as up:
        with httpx.Client(base_url=up.base_url) as client:
            assert client.get("/models").status_code == 401
            auth = {"authorization": "Bearer k"}
            assert [m["id"] for m in client.get("/models", headers=auth).json()["data"]] == ["a", "b"]
            missing = client.post("/chat/completions", json=CHAT, headers=auth)
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
            assert (
                client.post("/chat/completions", json={**CHAT, "model": "a"}, headers=auth).status_code == 200
            )
        assert httpx.get(f"{up.url}/health").status_code == 200


def test_break_stream_drops_the_connection() -> None:
    with FakeUpstream() as up, httpx.Client(base_url=up.base_url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.post(
                "/chat/completions",
                json={**CHAT, "stream": True},
                headers={"x-fake-behaviour": "break_stream"},
            )
        assert up.last_request.chunks_sent == 2


@pytest.mark.anyio
async def test_disconnect_is_recorded_and_ends_the_work() -> None:
    async with FakeUpstream(delay_ms=50, chunks=100) as up:
        async with httpx.AsyncClient(base_url=up.base_url) as client:
            async with client.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as response:
                async for _ in response.aiter_bytes():
                    break
            left_at = time.monotonic()
        record = up.last_request
        assert await record.wait_disconnected(2.0)
        assert record.completed_at is None and record.chunks_sent < 100
        assert record.disconnected_at is not None and record.disconnected_at - left_at < 0.25
        # A request that ran to the end is not reported as disconnected.
        async with httpx.AsyncClient(base_url=up.base_url) as client:
            await client.post("/chat/completions", json={**CHAT, "max_tokens": 2})
        assert up.last_request.completed_at is not None and not up.last_request.disconnected


def test_subprocess_with_control_endpoints() -> None:
    with FakeUpstream() as probe:  # borrow a free port
        port = probe.port
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmrouter.testing.upstream",
            "--port",
            str(port),
            "--chunks",
            "4",
            "--model",
            "sub",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, (
                "the subprocess upstream did not start"
            )
            time.sleep(0.05)
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == "sub"
        assert httpx.post(f"{base}/_fake/script", json=["rate_limit"]).status_code == 200
        assert httpx.post(f"{base}/v1/chat/completions", json=CHAT).status_code == 429
        streamed = httpx.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True})
        assert len(sse_data(streamed.text)) == 1 + 4 + 1 + 1  # role, 4 pieces, finish, [DONE]
        records = httpx.get(f"{base}/_fake/requests").json()
        assert [r["behaviour"] for r in records[-2:]] == ["rate_limit", ""]
        assert records[-1]["json"]["stream"] is True
        httpx.post(f"{base}/_fake/reset")
        assert httpx.get(f"{base}/_fake/requests").json() == []
    finally:
        proc.terminate()
        proc.wait(timeout=10)
