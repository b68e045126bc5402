"""OpenAICompatClient sends through its own transport, or through an injected client."""

import asyncio

import httpx
import pytest

from llmrouter.errors import ConfigError, RateLimitError, UpstreamError
from llmrouter.openai_compat import OpenAICompatClient
from llmrouter.types import ChatMessage, ChatRequest

pytestmark = pytest.mark.anyio

ANSWER = (
    b'{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


def request() -> ChatRequest:
    return ChatRequest(model="m", messages=[ChatMessage(role="user", content="x")])


async def test_an_injected_client_is_used_with_its_hooks():
    seen = []

    async def hook(req: httpx.Request) -> None:
        seen.append((req.method, str(req.url), req.headers["authorization"]))

    client = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=ANSWER)),
        event_hooks={"request": [hook]},
    )
    upstream = OpenAICompatClient("http://upstream.test/v1", api_key="sk-1", http_client=client)
    response = await upstream.chat(request())
    assert response.choices[0].message.content == "hi"
    assert seen == [("POST", "http://upstream.test/v1/chat/completions", "Bearer sk-1")]
    await upstream.aclose()
    assert not client.is_closed, "an injected client belongs to its owner"
    await client.aclose()


async def test_an_injected_transport_gets_the_request_directly():
    bodies = []

    def handler(req: httpx.Request) -> httpx.Response:
        bodies.append(req.content)
        return httpx.Response(200, content=ANSWER)

    upstream = OpenAICompatClient("http://upstream.test", transport=httpx.MockTransport(handler))
    await upstream.chat(request())
    assert b'"model":"m"' in bodies[0] and b'"stream":true' not in bodies[0]
    await upstream.aclose()


def _sse_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_a_stream_dropped_right_after_done_has_ended_well():
    """The bytes after ``[DONE]`` are read only to reuse the connection: an upstream that
    drops it there (no chunked terminator) answered in full, and the stream ends as such."""
    events = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"A"},"finish_reason":"stop"}]}\n\n'
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )

    async def answer_and_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            + _sse_chunk(events)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_and_drop, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        upstream = OpenAICompatClient(f"http://127.0.0.1:{port}/v1")
        chunks = [chunk async for chunk in upstream.stream(request())]
        await upstream.aclose()
    assert chunks[0].choices[0].delta.content == "A"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 2


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_redirect_is_not_followed_and_names_where_it_points(streaming: bool):
    moved = httpx.MockTransport(
        lambda r: httpx.Response(308, headers={"location": "https://upstream.test/v1/chat/completions"})
    )
    upstream = OpenAICompatClient("http://upstream.test/v1", transport=moved)
    with pytest.raises(UpstreamError) as caught:
        if streaming:
            [chunk async for chunk in upstream.stream(request())]
        else:
            await upstream.chat(request())
    await upstream.aclose()
    assert "redirected (HTTP 308) to https://upstream.test/v1/chat/completions" in caught.value.message
    assert not caught.value.retryable


async def test_a_choice_failed_in_a_200_answer_raises_the_answers_error():
    """OpenRouter's model failed mid-answer: ``finish_reason: "error"`` and the cause in
    ``error``, whose status and words the client gets (before: a bare 502 without them)."""
    failed = (
        b'{"id":"x","object":"chat.completion","created":1,"model":"m",'
        b'"error":{"code":429,"message":"Rate limit exceeded upstream: retry shortly"},'
        b'"choices":[{"index":0,"message":{"role":"assistant","content":"par"},"finish_reason":"error"}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
    )
    upstream = OpenAICompatClient(
        "http://upstream.test/v1",
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=failed)),
    )
    with pytest.raises(RateLimitError) as caught:
        await upstream.chat(request())
    await upstream.aclose()
    assert caught.value.message == "Rate limit exceeded upstream: retry shortly"
    assert caught.value.retryable


@pytest.mark.parametrize(
    ("headers", "api_key"),
    [
        ({"X-Title": "Café ☕ Bot"}, None),
        ({}, "sk-☕"),
        ({"x-a": "b\r\nx-c: d"}, None),
        ({"X Org": "a"}, None),
        ({"x-org:": "a"}, None),
    ],
)
def test_a_header_http_cannot_carry_fails_at_construction(headers: dict[str, str], api_key: str | None):
    """Not on every request, as a retryable error that cools the deployment down."""
    with pytest.raises(ConfigError) as caught:
        OpenAICompatClient("http://upstream.test/v1", headers=headers, api_key=api_key)
    assert "☕" not in caught.value.message and "sk-" not in caught.value.message


def test_a_header_value_is_checked_for_the_transport_that_sends_it():
    """The built-in pool writes latin-1; httpx, ASCII."""
    OpenAICompatClient("http://upstream.test/v1", headers={"x-org": "é"})
    with pytest.raises(ConfigError, match="only ascii"):
        OpenAICompatClient(
            "http://upstream.test/v1",
            headers={"x-org": "é"},
            transport=httpx.MockTransport(lambda r: httpx.Response(200, content=ANSWER)),
        )


async def test_the_usage_chunk_made_for_a_stream_without_one_keeps_its_tier_and_fingerprint():
    # An upstream that sends no usage: the chunk the client gets with the estimate had
    # neither, where every chunk of the answer carried them.
    chunk = (
        b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"service_tier":"flex","system_fingerprint":"fp_1",'
        b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    upstream = OpenAICompatClient(
        "http://upstream.test/v1",
        transport=httpx.MockTransport(
            lambda r: httpx.Response(200, content=chunk, headers={"content-type": "text/event-stream"})
        ),
    )
    chunks = [c async for c in upstream.stream(request())]
    await upstream.aclose()
    made = chunks[-1]
    assert made.usage is not None and made.usage.estimated
    assert (made.service_tier, made.system_fingerprint) == ("flex", "fp_1")
