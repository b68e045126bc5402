"""What RemoteProvider sends upstream, and how it reads what comes back."""

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import msgspec
import pytest
from llmrouter_remote import RemoteOptions, RemoteProvider

from llmrouter.context import RequestContext, current_context
from llmrouter.errors import ConfigError, InvalidRequestError, UpstreamConnectionError, UpstreamError
from llmrouter.registry import create_provider, load_provider_class
from llmrouter.testing.conformance import collect_stream
from llmrouter.testing.upstream import Behaviour, FakeUpstream
from llmrouter.types import decode_chat_request, decode_completion_request

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def echo_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(reply="You said: {last_user}", models=["served-model"]) as upstream:
        yield upstream


@pytest.fixture
async def remote(echo_upstream: FakeUpstream) -> AsyncIterator[RemoteProvider]:
    echo_upstream.reset()
    provider = RemoteProvider("served-model", base_url=echo_upstream.base_url, headers={"x-team": "blue"})
    async with provider:
        yield provider


async def test_unknown_request_fields_reach_the_upstream(
    remote: RemoteProvider, echo_upstream: FakeUpstream
) -> None:
    request = decode_chat_request(
        {
            "model": "my-group",
            "messages": [{"role": "user", "content": "hello"}],
            "top_k": 5,
            "repetition_penalty": 1.1,
            "chat_template_kwargs": {"enable_thinking": False},
            "safety_identifier": "customer-42",
        }
    )
    response = await remote.chat(request)
    assert response.choices[0].message.content == "You said: hello"
    sent = echo_upstream.last_request.json
    assert sent["top_k"] == 5 and sent["repetition_penalty"] == 1.1
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}
    assert sent["safety_identifier"] == "customer-42"
    assert sent["model"] == "served-model"  # the deployment's model, not the group name
    assert "stream" not in sent or sent["stream"] is False
    assert "__extra__" not in sent


async def test_stream_always_asks_for_usage(remote: RemoteProvider, echo_upstream: FakeUpstream) -> None:
    request = decode_chat_request(
        {
            "model": "served-model",
            "messages": [{"role": "user", "content": "a b"}],
            "stream": True,
            "top_k": 3,
        }
    )
    chunks = await collect_stream(remote.stream(request))
    sent = echo_upstream.last_request.json
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["top_k"] == 3
    assert chunks[-1].usage is not None and not chunks[-1].usage.estimated
    assert "".join(c.delta.content or "" for ch in chunks for c in ch.choices) == "You said: a b"


async def test_finished_streams_reuse_the_pooled_connection(
    remote: RemoteProvider, echo_upstream: FakeUpstream
) -> None:
    # Reading past [DONE] to the end of the body lets httpx pool the connection; stopping
    # at [DONE] would close it and cost a new TCP connection per stream.
    request = decode_chat_request(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    for _ in range(3):
        await collect_stream(remote.stream(request))
    await remote.chat(request)
    clients = {r.client for r in echo_upstream.generation_requests()}
    assert len(clients) == 1, clients


async def test_completion_sends_max_tokens_explicitly(
    remote: RemoteProvider, echo_upstream: FakeUpstream
) -> None:
    # 16 is the wire default (so omitted by msgspec), but llama.cpp's default is unlimited.
    await remote.complete(decode_completion_request({"model": "x", "prompt": "p"}))
    assert echo_upstream.last_request.json["max_tokens"] == 16


async def test_context_and_option_headers_are_forwarded(
    remote: RemoteProvider, echo_upstream: FakeUpstream
) -> None:
    ctx = RequestContext(
        request_id="req-123", traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    )
    token = current_context.set(ctx)
    try:
        await collect_stream(
            remote.stream(
                decode_chat_request(
                    {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
                )
            )
        )
    finally:
        current_context.reset(token)
    headers = echo_upstream.last_request.headers
    assert headers["x-request-id"] == "req-123"
    assert headers["traceparent"] == ctx.traceparent
    assert headers["x-team"] == "blue"
    assert headers["accept"] == "text/event-stream"
    await remote.chat(decode_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}]}))
    assert "x-request-id" not in echo_upstream.last_request.headers


async def test_configured_headers_replace_the_clients_own_whatever_their_case() -> None:
    # A virtual host, say: before, "Host" went out beside the client's "host" (two Host
    # lines, which servers refuse with a 400), and "Accept" beside "accept".
    heads: list[bytes] = []
    answer = msgspec.json.encode(
        {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head.lower())
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(answer)
        )
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    headers = {"Host": "llm.internal.example", "Accept": "application/json", "X-Team": "blue"}
    async with server, RemoteProvider("m", base_url=f"http://127.0.0.1:{port}/v1", headers=headers) as remote:
        await remote.chat(decode_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}]}))
    (head,) = heads
    assert head.count(b"\r\nhost: ") == 1 and b"\r\nhost: llm.internal.example\r\n" in head
    assert head.count(b"\r\naccept: ") == 1 and b"\r\nx-team: blue\r\n" in head


async def test_tool_calls_round_trip(remote: RemoteProvider, echo_upstream: FakeUpstream) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
        ],
    }
    echo_upstream.enqueue("tool_call", "tool_call")
    response = await remote.chat(decode_chat_request(body))
    (call,) = response.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and response.choices[0].finish_reason == "tool_calls"
    assert echo_upstream.last_request.json["tools"][0]["function"]["name"] == "get_weather"
    chunks = await collect_stream(remote.stream(decode_chat_request({**body, "stream": True})))
    deltas = [t for ch in chunks for c in ch.choices for t in c.delta.tool_calls or []]
    assert deltas and deltas[0].function is not None and deltas[0].function.name == "get_weather"
    assert chunks[-1].usage is not None


async def test_list_models_and_health(remote: RemoteProvider, echo_upstream: FakeUpstream) -> None:
    assert [m.id for m in await remote.list_models()] == ["served-model"]
    health = await remote.health()
    assert health.ok and health.latency_ms is not None and health.latency_ms >= 0
    async with RemoteProvider("missing-model", base_url=echo_upstream.url) as other:  # no /v1: added
        health = await other.health()
        assert not health.ok and "missing-model" in health.detail
    async with RemoteProvider("missing-model", base_url=echo_upstream.url, check_model=False) as lax:
        assert (await lax.health()).ok


async def test_health_detail_shows_the_base_url_without_credentials(echo_upstream: FakeUpstream) -> None:
    # The detail reaches /ready, which needs no key.
    host = echo_upstream.url.split("://", 1)[1]
    base_url = f"http://svc:s3cretpw@{host}/v1?token=qs3cret"
    async with RemoteProvider("served-model", base_url=base_url) as provider:
        health = await provider.health()
    assert health.ok and health.detail == f"http://{host}/v1 serves 'served-model'"


def test_registered_under_entry_point_and_config_errors() -> None:
    assert load_provider_class("remote") is RemoteProvider
    provider = create_provider("remote", "m", {"base_url": "http://h:8000/v1", "max_connections": 8})
    assert isinstance(provider.options, RemoteOptions) and provider.options.max_connections == 8
    caps = provider.capabilities
    assert caps.streaming and caps.tools and caps.json_mode and caps.vision and caps.completions
    with pytest.raises(ConfigError, match="base_url"):
        create_provider("remote", "m", {}, path="models[g].deployments[0]")
    with pytest.raises(ConfigError, match="bogus"):
        create_provider("remote", "m", {"base_url": "http://h", "bogus": 1})


# --- odd upstreams, through an injected MockTransport ------------------------------------------


def mock_provider(handler) -> RemoteProvider:
    return RemoteProvider("m", base_url="http://upstream.test/v1", transport=httpx.MockTransport(handler))


async def test_lenient_decoding_of_bent_schemas() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        # created as a string, usage numbers as strings: seen from home-grown servers.
        body = {
            "id": "x",
            "created": "1700000000",
            "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": "3", "completion_tokens": 1, "total_tokens": 4},
        }
        return httpx.Response(200, json=body)

    async with mock_provider(handler) as provider:
        response = await provider.chat(
            decode_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}]})
        )
    assert response.created == 1700000000 and response.usage is not None and response.usage.prompt_tokens == 3


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            400,
            {"object": "error", "message": "vllm says no", "type": "BadRequestError", "code": 400},
            "vllm says no",
        ),
        (400, {"error": "llama.cpp says no"}, "llama.cpp says no"),
        (400, {"detail": "fastapi says no"}, "fastapi says no"),
        (400, b"plain text", "plain text"),
        (400, b"<html>no title</html>", "upstream answered HTTP 400 (an HTML page)"),
        (
            502,
            b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body><center><h1>502 Bad "
            b"Gateway</h1></center><hr><center>nginx</center></body>\r\n</html>",
            "upstream answered HTTP 502: 502 Bad Gateway",
        ),
        (502, b"", "upstream answered HTTP 502"),
    ],
)
async def test_error_body_shapes(status: int, body: object, message: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, bytes):
            return httpx.Response(status, content=body)
        return httpx.Response(status, json=body)

    async with mock_provider(handler) as provider:
        with pytest.raises((InvalidRequestError, UpstreamError)) as caught:
            await provider.chat(
                decode_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}]})
            )
    assert caught.value.message == message
    assert caught.value.retryable is (status >= 500)


@pytest.mark.parametrize("body", [{"foo": 1}, {}, {"id": "x", "object": "chat.completion", "choices": []}])
async def test_an_answer_without_choices_is_an_upstream_error(body: dict[str, object]) -> None:
    # It reached clients as a 200 whose choices[0] every SDK user then fails to read.
    async with mock_provider(lambda request: httpx.Response(200, json=body)) as provider:
        with pytest.raises(UpstreamError, match="/chat/completions answered no choices"):
            await provider.chat(
                decode_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}]})
            )
        with pytest.raises(UpstreamError, match="/completions answered no choices"):
            await provider.complete(decode_completion_request({"model": "m", "prompt": "x"}))


async def test_sse_without_done_or_final_blank_line_and_with_comments() -> None:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "hé"}, "finish_reason": None}],
    }
    last = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    payload = (
        b": keep-alive\r\n\r\n"
        + b"data: "
        + msgspec.json.encode(chunk)
        + b"\r\n\r\n"
        + b"event: message\ndata: "
        + msgspec.json.encode(last)
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=payload, headers={"content-type": "text/event-stream"})

    async with mock_provider(handler) as provider:
        chunks = await collect_stream(
            provider.stream(
                decode_chat_request(
                    {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
                )
            )
        )
    assert [c.choices[0].delta.content for c in chunks[:1]] == ["hé"]
    assert chunks[1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.estimated and chunks[-1].choices == []


async def test_a_stream_cut_before_any_finish_reason_is_an_upstream_failure() -> None:
    # The connection closed mid-answer: neither [DONE] nor a finish_reason. Passed on as
    # a normal end (with [DONE] to the client), the client could not tell it was cut.
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "The capital"}, "finish_reason": None}],
    }

    def handler(request: httpx.Request) -> httpx.Response:
        payload = b"data: " + msgspec.json.encode(chunk) + b"\n\n"
        return httpx.Response(200, content=payload, headers={"content-type": "text/event-stream"})

    async with mock_provider(handler) as provider:
        request = decode_chat_request(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
        )
        received = []
        with pytest.raises(UpstreamConnectionError, match="ended mid-answer"):
            async for piece in provider.stream(request):
                received.append(piece)
    assert [c.choices[0].delta.content for c in received] == ["The capital"]


async def test_injected_http_client_is_left_open() -> None:
    client = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"data": []}))
    )
    async with RemoteProvider("m", base_url="http://u.test", http_client=client) as provider:
        assert await provider.list_models() == []
    assert not client.is_closed
    await client.aclose()


@pytest.mark.parametrize("reports_usage", [True, False])
async def test_a_json_answer_to_a_stream_request_is_streamed_on(
    remote: RemoteProvider, echo_upstream: FakeUpstream, reports_usage: bool
) -> None:
    """Some servers ignore ``"stream": true`` and answer one JSON object: the client still
    gets a stream (it got a 502 "ended without a chunk")."""
    echo_upstream.enqueue(Behaviour(ignore_stream=True, omit_usage=not reports_usage))
    request = decode_chat_request(
        {"model": "served-model", "messages": [{"role": "user", "content": "a b c"}], "stream": True}
    )
    chunks = await collect_stream(remote.stream(request))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "You said: a b c"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and usage.completion_tokens > 0
    assert usage.estimated is not reports_usage
    echo_upstream.enqueue("ignore_stream")
    completion = decode_completion_request({"model": "served-model", "prompt": "say", "stream": True})
    pieces = await collect_stream(remote.stream_complete(completion))
    assert pieces[0].choices[0].text and pieces[0].choices[0].finish_reason == "stop"
    assert pieces[-1].choices == [] and pieces[-1].usage is not None and not pieces[-1].usage.estimated


async def test_a_json_error_or_empty_answer_to_a_stream_request_is_an_upstream_error() -> None:
    bodies = iter(
        [
            {"error": {"message": "model is loading", "type": "server_error", "code": 503}},
            {"id": "x", "object": "chat.completion", "choices": []},
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=next(bodies))

    request = decode_chat_request(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    async with mock_provider(handler) as provider:
        with pytest.raises(UpstreamError, match="model is loading") as info:
            await collect_stream(provider.stream(request))
        assert info.value.http_status == 503 and info.value.retryable
        with pytest.raises(UpstreamError, match="answered no choices"):
            await collect_stream(provider.stream(request))
