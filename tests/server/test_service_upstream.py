"""The service on uvicorn, over the remote provider and the fake upstream, via the openai SDK."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from llmrouter.config import parse_config
from llmrouter.server import create_app
from llmrouter.server.app import default_extensions
from llmrouter.testing.upstream import Behaviour, FakeUpstream


def issue_config(base_url: str, **server: Any) -> Any:
    """The minimal config from issue 2, pointed at the fake upstream."""
    return parse_config(
        {
            "models": [
                {
                    "name": "mock-gpt",
                    "deployments": [{"provider": "remote", "model": "mock-gpt", "base_url": base_url}],
                }
            ],
            "router": {"retry": {"attempts": 0}},
            "server": server,
        },
        env={},
    )


@pytest.fixture
def service(fake: FakeUpstream, serve_app: Any) -> Iterator[str]:
    with serve_app(create_app(issue_config(fake.base_url, max_request_bytes=64 * 1024))) as url:
        yield url


@pytest.fixture
def client(service: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


MESSAGES: list[Any] = [{"role": "user", "content": "ping"}]


def test_sync_chat_and_stream(client: openai.OpenAI, fake: FakeUpstream) -> None:
    raw = client.chat.completions.with_raw_response.create(model="mock-gpt", messages=MESSAGES)
    reply = raw.parse()
    assert reply.choices[0].message.content == "Echo: ping"
    assert reply.choices[0].index == 0 and reply.object == "chat.completion"
    assert reply.usage is not None and reply.usage.total_tokens > 0
    assert raw.headers["x-llmrouter-deployment"] == "remote/mock-gpt"
    assert fake.last_request.json["model"] == "mock-gpt"

    stream = client.chat.completions.create(
        model="mock-gpt", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: ping"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


@pytest.mark.anyio
async def test_async_chat_and_stream(service: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0) as sdk:
        reply = await sdk.chat.completions.create(model="mock-gpt", messages=MESSAGES)
        assert reply.choices[0].message.content == "Echo: ping"
        stream = await sdk.chat.completions.create(model="mock-gpt", messages=MESSAGES, stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == "Echo: ping"
        models = await sdk.models.list()
        assert [m.id for m in models.data] == ["mock-gpt"]


def test_sdk_errors(client: openai.OpenAI, fake: FakeUpstream) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert not_found.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="mock-gpt", messages=[])
    assert bad.value.param == "messages"

    fake.enqueue("rate_limit")
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="mock-gpt", messages=MESSAGES)
    assert limited.value.response.headers.get("retry-after")

    fake.enqueue("rate_limit")
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="mock-gpt", messages=MESSAGES, stream=True)

    huge = [{"role": "user", "content": "x" * 70_000}]
    with pytest.raises(openai.APIStatusError) as too_large:
        client.chat.completions.create(model="mock-gpt", messages=huge)  # type: ignore[arg-type]
    assert too_large.value.status_code == 413

    fake.enqueue("server_error")
    with pytest.raises(openai.APIStatusError) as upstream_failed:
        client.chat.completions.create(model="mock-gpt", messages=MESSAGES)
    assert upstream_failed.value.status_code >= 500
    assert "Traceback" not in upstream_failed.value.response.text


def test_an_upstream_401_is_a_502_not_the_clients_401(client: openai.OpenAI, fake: FakeUpstream) -> None:
    # The upstream refused the deployment's own credentials: the client's key (here, none
    # is needed) is not at fault, and an SDK must not read it as an AuthenticationError.
    for stream in (False, True):
        fake.enqueue("unauthorized")
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="mock-gpt", messages=MESSAGES, stream=stream)
        assert refused.value.status_code == 502 and refused.value.code == "upstream_authentication_failed"
        assert "refused the credentials of deployment" in refused.value.message
        assert "(remote): bad key" in refused.value.message
        if not stream:  # the SDKs must not present the same credentials again
            assert refused.value.response.headers["x-should-retry"] == "false"


def test_legacy_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="mock-gpt", prompt="pong")
    assert reply.choices[0].text == "Echo: pong"


def _post_raw(url: str, body: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_closes_the_upstream_connection(
    service: str, fake: FakeUpstream, stream: bool
) -> None:
    # The upstream answers slowly; the client goes away mid-request and the router must
    # close its upstream connection promptly instead of waiting for the answer.
    # A long, slow answer: it cannot finish before the disconnect reaches the upstream.
    fake.enqueue(Behaviour(reply="word " * 200, chunks=200, delay_ms=50) if stream else "hang")
    body = b'{"model": "mock-gpt", "stream": %s, "messages": [{"role": "user", "content": "hi"}]}' % (
        b"true" if stream else b"false"
    )
    sock = _post_raw(service, body)
    (upstream_request,) = await fake.wait_for_requests(1)
    if stream:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # the stream has started
    closed_at = time.monotonic()
    sock.close()
    assert await upstream_request.wait_disconnected(timeout=5)
    assert upstream_request.disconnected_at is not None
    assert upstream_request.disconnected_at - closed_at < 0.25


def test_ready_reports_the_upstream(service: str) -> None:
    ready = httpx.get(f"{service}/ready", timeout=5).json()
    assert ready["ready"] is True
    assert ready["deployments"][0]["id"] == "remote/mock-gpt"


@pytest.mark.anyio
async def test_a_coalesced_request_outlives_the_first_client_leaving(
    fake: FakeUpstream, serve_app: Any
) -> None:
    # Two identical deterministic requests: the second attends the first one's call. The
    # first client goes away; its upstream call stops, and the second calls again itself.
    config = parse_config(
        {
            "models": [
                {
                    "name": "mock-gpt",
                    "deployments": [{"provider": "remote", "model": "mock-gpt", "base_url": fake.base_url}],
                }
            ],
            "router": {"retry": {"attempts": 0}},
            "cache": {"backend": "memory"},
            "accounting": {"enabled": False},
            "telemetry": {"metrics": False},
        },
        env={},
    )
    fake.enqueue("hang")  # the first call never answers; the second is the echo
    body = b'{"model": "mock-gpt", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}'
    with serve_app(create_app(config, extensions=default_extensions(config))) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            sock = _post_raw(url, body)
            (first,) = await fake.wait_for_requests(1)
            second = asyncio.ensure_future(
                http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            )
            for _ in range(500):
                if (await http.get("/ready?probe=false")).json()["extensions"]["cache"]["coalesced"] == 1:
                    break
                await asyncio.sleep(0.01)
            sock.close()
            assert await first.wait_disconnected(timeout=5)
            answer = await asyncio.wait_for(second, 10)
    assert answer.status_code == 200 and answer.headers["x-llmrouter-cache"] == "miss"
    assert answer.json()["choices"][0]["message"]["content"] == "Echo: hi"
    calls = [r for r in fake.requests if r.path == "/v1/chat/completions"]
    assert len(calls) == 2 and calls[0].disconnected_at is not None and calls[1].completed_at is not None
