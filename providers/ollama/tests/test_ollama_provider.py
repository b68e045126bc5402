"""OllamaProvider against the fake daemon, driven through the real ``ollama`` client."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from fake_ollama import FakeOllama
from llmrouter_ollama import OllamaOptions, OllamaProvider
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llmrouter import Router, parse_config
from llmrouter.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    RateLimitError,
    UnsupportedFeatureError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamUnavailableError,
)
from llmrouter.types import ChatChunk, decode_chat_request, decode_completion_request

pytestmark = pytest.mark.anyio

REPLY = "Hello from the fake Ollama daemon."


def chat_request(**fields: Any):
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "Say hello please"}], **fields}
    return decode_chat_request(body)


@pytest.fixture
async def provider(ollama_url: str) -> AsyncIterator[OllamaProvider]:
    async with OllamaProvider("llama3.2", OllamaOptions(host=ollama_url)) as p:
        yield p


async def collect(stream: AsyncIterator[ChatChunk]) -> list[ChatChunk]:
    return [chunk async for chunk in stream]


def sent_body(fake: FakeOllama, path: str = "/api/chat") -> dict[str, Any]:
    return [body for p, body in fake.requests if p == path][-1]


# --- chat -----------------------------------------------------------------------------


async def test_chat_returns_text_usage_and_finish_reason(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    response = await provider.chat(chat_request())
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY
    assert choice.finish_reason == "stop"
    assert response.model == "llama3.2:latest"
    # The fake counts prompt words + 1 per message, and one token per word.
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (4, 6)
    assert response.usage.total_tokens == 10
    assert response.usage.estimated is False
    assert sent_body(fake_ollama)["stream"] is False


async def test_sampling_options_are_mapped(provider: OllamaProvider, fake_ollama: FakeOllama) -> None:
    await provider.chat(
        chat_request(
            temperature=0.2, top_p=0.9, max_tokens=50, stop=["\n\n"], seed=7, top_k=20, keep_alive="1m"
        )
    )
    body = sent_body(fake_ollama)
    assert body["options"] == {
        "temperature": 0.2,
        "top_p": 0.9,
        "num_predict": 50,
        "stop": ["\n\n"],
        "seed": 7,
        "top_k": 20,
    }
    assert body["keep_alive"] == "1m"


async def test_deployment_model_options_are_defaults_the_request_overrides(
    ollama_url: str, fake_ollama: FakeOllama
) -> None:
    options = OllamaOptions(
        host=ollama_url, model_options={"num_ctx": 8192, "temperature": 1.0}, keep_alive="10m"
    )
    async with OllamaProvider("llama3.2", options) as p:
        await p.chat(chat_request(temperature=0.0))
    body = sent_body(fake_ollama)
    assert body["options"] == {"num_ctx": 8192, "temperature": 0.0}
    assert body["keep_alive"] == "10m"


async def test_max_tokens_ends_with_length(provider: OllamaProvider) -> None:
    response = await provider.chat(chat_request(max_completion_tokens=2))
    assert response.choices[0].message.content == "Hello from "
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 2


async def test_stop_sequence_cuts_the_reply(provider: OllamaProvider) -> None:
    response = await provider.chat(chat_request(stop="fake"))
    assert response.choices[0].message.content == "Hello from the "
    assert response.choices[0].finish_reason == "stop"


async def test_json_mode_sets_format(provider: OllamaProvider, fake_ollama: FakeOllama) -> None:
    response = await provider.chat(chat_request(response_format={"type": "json_object"}))
    assert json.loads(response.choices[0].message.content or "") == {"answer": "fake"}
    assert sent_body(fake_ollama)["format"] == "json"
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    await provider.chat(
        chat_request(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    )
    assert sent_body(fake_ollama)["format"] == schema


async def test_uncounted_prompt_is_estimated(provider: OllamaProvider, fake_ollama: FakeOllama) -> None:
    fake_ollama.omit_prompt_count = True
    response = await provider.chat(chat_request())
    assert response.usage is not None
    assert response.usage.estimated is True
    assert response.usage.prompt_tokens > 0
    assert response.usage.completion_tokens == 6


# --- streaming ------------------------------------------------------------------------


async def test_stream_yields_deltas_then_finish_then_usage(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    chunks = await collect(provider.stream(chat_request(stream=True)))
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == REPLY
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content_chunks[1:])
    assert chunks[-2].choices[0].finish_reason == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (4, 6, 10)
    assert len({c.id for c in chunks}) == 1
    assert sent_body(fake_ollama)["stream"] is True


async def test_stream_length_limit(provider: OllamaProvider) -> None:
    chunks = await collect(provider.stream(chat_request(max_tokens=3)))
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_stream_thinking_becomes_reasoning_content(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    chunks = await collect(provider.stream(chat_request(think=True)))
    assert sent_body(fake_ollama)["think"] is True
    assert chunks[0].choices[0].delta.reasoning_content == "Let me think."


@pytest.mark.parametrize(
    ("fields", "think"),
    [
        ({"reasoning_effort": "high"}, "high"),
        ({"reasoning_effort": "medium"}, "medium"),
        ({"reasoning": {"effort": "low"}}, "low"),
        ({"reasoning_effort": "none"}, False),
        ({"reasoning_effort": "high", "think": False}, False),
    ],
    ids=["high", "medium", "reasoning-object", "none", "native-think-wins"],
)
async def test_reasoning_effort_becomes_think(
    provider: OllamaProvider, fake_ollama: FakeOllama, fields: dict[str, Any], think: Any
) -> None:
    """As Ollama's own OpenAI layer maps it; dropped, a client asking for no thinking
    (``none``) got the model's default, thinking included."""
    await provider.chat(chat_request(**fields))
    assert sent_body(fake_ollama)["think"] == think


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"reasoning_effort": "minimal"}, "reasoning_effort"),
        ({"reasoning": {"effort": 3}}, "reasoning.effort"),
    ],
)
async def test_an_effort_ollama_does_not_know_is_refused(
    provider: OllamaProvider, fake_ollama: FakeOllama, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await provider.chat(chat_request(**fields))
    assert info.value.param == param and info.value.http_status == 400
    assert '"high", "medium", "low" or "none"' in info.value.message
    assert [p for p, _ in fake_ollama.requests if p == "/api/chat"] == []


async def test_chat_logprobs_are_openais_shape(provider: OllamaProvider, fake_ollama: FakeOllama) -> None:
    """Every entry has ``bytes`` and ``top_logprobs``: the OpenAI SDK rejects a completion
    without them."""
    response = await provider.chat(chat_request(logprobs=True, top_logprobs=2))
    assert sent_body(fake_ollama)["top_logprobs"] == 2
    parsed = ChatCompletion.model_validate(json.loads(msgspec.json.encode(response)))
    content = parsed.choices[0].logprobs.content if parsed.choices[0].logprobs else None
    assert content is not None and len(content) == 6
    first = content[0]
    assert (first.token, first.logprob, first.bytes) == ("Hello ", -0.1, list(b"Hello "))
    assert [(top.token, top.bytes) for top in first.top_logprobs] == [
        ("Hello ", list(b"Hello ")),
        ("alt1", list(b"alt1")),
    ]
    without_top = await provider.chat(chat_request(logprobs=True))
    entries = ChatCompletion.model_validate(json.loads(msgspec.json.encode(without_top))).choices[0].logprobs
    assert entries is not None and entries.content and entries.content[0].top_logprobs == []


async def test_streamed_logprobs_are_openais_shape(provider: OllamaProvider) -> None:
    chunks = await collect(provider.stream(chat_request(logprobs=True, top_logprobs=1)))
    parsed = [ChatCompletionChunk.model_validate(json.loads(msgspec.json.encode(c))) for c in chunks]
    entries = [
        e for c in parsed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or ()
    ]
    assert [e.token for e in entries] == ["Hello ", "from ", "the ", "fake ", "Ollama ", "daemon."]
    assert all(e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 1 for e in entries)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_earlier_thinking_goes_back_as_ollamas_thinking(
    provider: OllamaProvider, fake_ollama: FakeOllama, field: str
) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", field: "They greet me."},
        {"role": "user", "content": "Again"},
    ]
    await provider.chat(chat_request(messages=messages))
    assert sent_body(fake_ollama)["messages"][1]["thinking"] == "They greet me."


# --- tools and messages -----------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a place",
        "parameters": {
            "type": "object",
            "properties": {
                "place": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                    "required": ["city"],
                },
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["place"],
            "additionalProperties": False,
        },
    },
}


async def test_tool_schema_reaches_the_daemon_unchanged(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    await provider.chat(chat_request(tools=[WEATHER_TOOL]))
    assert sent_body(fake_ollama)["tools"] == [WEATHER_TOOL]


async def test_tool_call_response(provider: OllamaProvider, fake_ollama: FakeOllama) -> None:
    fake_ollama.tool_call = {"name": "get_weather", "arguments": {"place": {"city": "Paris"}, "days": 2}}
    response = await provider.chat(chat_request(tools=[WEATHER_TOOL]))
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"place": {"city": "Paris"}, "days": 2}


async def test_streamed_tool_call(provider: OllamaProvider, fake_ollama: FakeOllama) -> None:
    fake_ollama.tool_call = {"name": "get_weather", "arguments": {"place": {"city": "Oslo"}}}
    chunks = await collect(provider.stream(chat_request(tools=[WEATHER_TOOL])))
    calls = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert [(d.index, d.function.name if d.function else None) for d in calls] == [(0, "get_weather")]
    assert chunks[-2].choices[0].finish_reason == "tool_calls"


async def test_tool_choice_none_offers_no_tools(provider: OllamaProvider, fake_ollama: FakeOllama) -> None:
    await provider.chat(chat_request(tools=[WEATHER_TOOL], tool_choice="none"))
    assert "tools" not in sent_body(fake_ollama)


async def test_tool_choice_required_is_refused(provider: OllamaProvider, fake_ollama: FakeOllama) -> None:
    """Ollama cannot force a call: sent as ``auto``, the model may answer in text to a
    client that counts on a call."""
    with pytest.raises(UnsupportedFeatureError) as info:
        await provider.chat(chat_request(tools=[WEATHER_TOOL], tool_choice="required"))
    assert info.value.param == "tool_choice" and '"auto", "none"' in info.value.message
    assert [p for p, _ in fake_ollama.requests if p == "/api/chat"] == []


AUDIO_ANSWER = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}


async def test_a_request_for_an_audio_answer_is_refused(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    """Before: answered in text, to a client that asked for audio."""
    with pytest.raises(UnsupportedFeatureError) as info:
        await provider.chat(chat_request(**AUDIO_ANSWER))
    assert info.value.param == "modalities" and info.value.http_status == 400
    with pytest.raises(UnsupportedFeatureError):
        [chunk async for chunk in provider.stream(chat_request(stream=True, **AUDIO_ANSWER))]
    assert [p for p, _ in fake_ollama.requests if p == "/api/chat"] == []
    await provider.chat(chat_request(modalities=["text"]))


async def test_conversation_with_images_and_tool_results(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    request = decode_chat_request(
        {
            "model": "llama3.2",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": data_url}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"place": {"city": "Paris"}}'},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
        }
    )
    await provider.chat(request)
    messages = sent_body(fake_ollama)["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"] == "What is this?"
    assert base64.b64decode(messages[1]["images"][0]) == png
    assert messages[2]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"place": {"city": "Paris"}}}}
    ]
    assert messages[3] == {"role": "tool", "content": "sunny", "tool_name": "get_weather"}


async def test_remote_image_urls_are_refused(provider: OllamaProvider, fake_ollama: FakeOllama) -> None:
    request = chat_request(
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}],
            }
        ]
    )
    with pytest.raises(UnsupportedFeatureError) as info:
        await provider.chat(request)
    assert info.value.param == "messages[0].content[0]"
    assert info.value.http_status == 400
    assert [p for p, _ in fake_ollama.requests if p == "/api/chat"] == []


async def test_bad_tool_arguments_are_a_400(provider: OllamaProvider) -> None:
    request = chat_request(
        messages=[
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                ],
            },
            {"role": "user", "content": "hi"},
        ]
    )
    with pytest.raises(InvalidRequestError) as info:
        await provider.chat(request)
    assert info.value.param == "messages[0].tool_calls[0].function.arguments"


async def test_several_choices_are_refused(provider: OllamaProvider) -> None:
    with pytest.raises(UnsupportedFeatureError):
        await provider.chat(chat_request(n=2))


# --- errors ----------------------------------------------------------------------------


async def test_model_not_pulled_is_a_clear_404(ollama_url: str) -> None:
    async with OllamaProvider("mistral", OllamaOptions(host=ollama_url)) as p:
        with pytest.raises(ModelNotFoundError) as info:
            await p.chat(chat_request())
        assert "ollama pull mistral" in info.value.message
        assert info.value.http_status == 404 and info.value.retryable is False
        with pytest.raises(ModelNotFoundError):
            await collect(p.stream(chat_request()))
        health = await p.health()
        assert health.ok is False and "ollama pull mistral" in health.detail


@pytest.mark.parametrize(
    ("status", "error_type", "retryable"),
    [
        (503, UpstreamUnavailableError, True),
        (500, UpstreamError, True),
        (429, RateLimitError, True),
        (400, InvalidRequestError, False),
    ],
)
async def test_error_statuses_map_to_the_tree(
    provider: OllamaProvider, fake_ollama: FakeOllama, status: int, error_type: type, retryable: bool
) -> None:
    fake_ollama.fail_status = status
    fake_ollama.fail_body = {"error": "server busy, please try again.  maximum pending requests exceeded"}
    fake_ollama.fail_headers = {"Retry-After": "7"}
    with pytest.raises(error_type) as info:
        await provider.chat(chat_request())
    assert info.value.retryable is retryable
    assert info.value.retry_after == 7.0
    assert "maximum pending requests exceeded" in info.value.message
    with pytest.raises(error_type):
        await collect(provider.stream(chat_request()))


async def test_newer_ollamas_model_not_found_wording(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    fake_ollama.fail_status = 404
    fake_ollama.fail_body = {"error": "model 'llama3.2' not found"}
    with pytest.raises(ModelNotFoundError, match=r"ollama pull llama3\.2"):
        await provider.chat(chat_request())


async def test_a_404_that_is_not_a_missing_model_says_check_host(
    ollama_url: str, fake_ollama: FakeOllama
) -> None:
    """Go's ``404 page not found`` (a wrong path in ``host``) is no model to pull: it fails
    over, without this deployment being tried again, and says where nothing answered."""
    async with OllamaProvider("llama3.2", OllamaOptions(host=f"{ollama_url}/ollama")) as p:
        with pytest.raises(UpstreamError) as info:
            await p.chat(chat_request())
        health = await p.health()
    assert not isinstance(info.value, ModelNotFoundError)
    assert info.value.http_status == 502 and info.value.retryable is False
    assert f"nothing at {ollama_url}/ollama/api/chat: check `host`" in info.value.message
    assert health.ok is False and f"nothing at {ollama_url}/ollama/api/tags" in health.detail
    assert "pull" not in health.detail


@pytest.mark.parametrize(
    "body", ["upstream busy, retry", ["busy"], None, 7], ids=["string", "list", "null", "number"]
)
async def test_an_error_body_that_is_no_json_object_keeps_its_status(
    provider: OllamaProvider, fake_ollama: FakeOllama, body: Any
) -> None:
    """The ollama client fails on it with AttributeError; a proxy's 503 must stay a
    retryable 503, for chats, streams and completions."""
    fake_ollama.fail_status = 503
    fake_ollama.fail_body = body
    fake_ollama.fail_headers = {"Retry-After": "3"}
    with pytest.raises(UpstreamUnavailableError) as info:
        await provider.chat(chat_request())
    assert info.value.retryable is True and info.value.retry_after == 3.0
    assert info.value.message == f"ollama: {body if isinstance(body, str) else json.dumps(body)}"
    with pytest.raises(UpstreamUnavailableError):
        await collect(provider.stream(chat_request()))
    with pytest.raises(UpstreamUnavailableError):
        await provider.complete(decode_completion_request({"model": "llama3.2", "prompt": "Hi"}))
    fake_ollama.fail_status = 404
    with pytest.raises(UpstreamError, match="check `host`"):
        await provider.chat(chat_request())


async def test_the_router_retries_a_proxys_503_with_a_json_string_body(
    ollama_url: str, fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    fake_ollama.fail_status = 503
    fake_ollama.fail_body = "upstream busy, retry"
    fake_ollama.fail_times = 1
    config = parse_config(
        {
            "models": [
                {
                    "name": "m",
                    "retry": {"attempts": 2, "backoff_base": 0.01},
                    "deployments": [{"provider": "ollama", "model": "llama3.2", "host": ollama_url}],
                }
            ]
        },
        env={},
    )
    with caplog.at_level(logging.DEBUG):
        async with Router(config) as router:
            response = await router.chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert response.choices[0].message.content == REPLY
    assert [p for p, _ in fake_ollama.requests if p == "/api/chat"] == ["/api/chat"] * 2
    assert not [r for r in caplog.records if "raised" in r.getMessage()]


async def test_a_model_without_tools_refuses_them(provider: OllamaProvider, fake_ollama: FakeOllama) -> None:
    # Ollama's 400 for it: as an InvalidRequestError the request failed as the client's
    # fault instead of moving on to a deployment that has tools.
    fake_ollama.fail_status = 400
    fake_ollama.fail_body = {"error": "registry.ollama.ai/library/gemma3:4b does not support tools"}
    with pytest.raises(UnsupportedFeatureError) as info:
        await provider.chat(chat_request())
    assert info.value.http_status == 400 and info.value.code == "unsupported_feature"
    assert "does not support tools" in info.value.message
    with pytest.raises(UnsupportedFeatureError):
        await collect(provider.stream(chat_request()))


async def test_broken_stream_is_a_retryable_connection_error(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    fake_ollama.break_after = 2
    seen: list[ChatChunk] = []
    with pytest.raises(UpstreamConnectionError) as info:
        async for chunk in provider.stream(chat_request()):
            seen.append(chunk)
    assert len(seen) == 2
    assert info.value.retryable is True


async def test_error_line_mid_stream(provider: OllamaProvider, fake_ollama: FakeOllama) -> None:
    fake_ollama.error_line_after = 1
    with pytest.raises(UpstreamError) as info:
        await collect(provider.stream(chat_request()))
    assert "out of memory" in info.value.message


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (
            b'{"model": "llama3.2", "message": {"role": "assistant", "content": "Hi"}, "done": false}',
            "not final",
        ),
        (
            b'{"model": "llama3.2", "message": {"role": "assistant", "content": "Hi"}, "response": "Hi"}',
            "not final",
        ),
        (
            b'{"model": "llama3.2", "message": {"role": "assistant", "content": "\xff"}, "done": true}',
            "malformed",
        ),
        (b'["Hi"]', "malformed"),
        (b'"Hi"', "malformed"),
    ],
    ids=["not-done", "no-done", "not-utf8", "a-list", "a-string"],
)
async def test_a_broken_whole_answer_is_an_upstream_error(answer: bytes, why: str) -> None:
    """An answer to ``stream: false`` that is not marked done, or not UTF-8: a 502 that
    says so (not an empty completion, not an unexpected error with a traceback)."""

    def daemon(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=answer, headers={"content-type": "application/json"})

    options = OllamaOptions(host="http://ollama.test")
    async with OllamaProvider("llama3.2", options, transport=httpx.MockTransport(daemon)) as p:
        with pytest.raises(UpstreamError, match=why) as chat:
            await p.chat(chat_request())
        with pytest.raises(UpstreamError, match=why) as complete:
            await p.complete(decode_completion_request({"model": "llama3.2", "prompt": "Hi"}))
    assert chat.value.http_status == complete.value.http_status == 502


async def test_no_daemon_is_a_connection_error(dead_url: str) -> None:
    async with OllamaProvider("llama3.2", OllamaOptions(host=dead_url)) as p:
        with pytest.raises(UpstreamConnectionError) as info:
            await p.chat(chat_request())
        assert dead_url in info.value.message
        with pytest.raises(UpstreamConnectionError):
            await collect(p.stream(chat_request()))
        assert (await p.health()).ok is False


# --- cancellation ----------------------------------------------------------------------


async def wait_for_disconnect(fake: FakeOllama, bound: float = 1.0) -> float:
    started = time.monotonic()
    while not fake.disconnected.is_set():
        if time.monotonic() - started > bound:
            break
        await anyio.sleep(0.01)
    return time.monotonic() - started


async def test_closing_the_stream_closes_the_daemon_connection(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    fake_ollama.token_delay = 0.2
    fake_ollama.reply = " ".join(["word"] * 50)
    stream = provider.stream(chat_request())
    first = await stream.__anext__()
    assert first.choices[0].delta.content == "word "
    await stream.aclose()
    waited = await wait_for_disconnect(fake_ollama)
    assert fake_ollama.disconnects == ["/api/chat"], f"no disconnect seen after {waited:.2f}s"


async def test_cancelling_a_streaming_task_closes_the_connection(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    fake_ollama.token_delay = 0.2
    fake_ollama.reply = " ".join(["word"] * 50)
    received: list[ChatChunk] = []
    with anyio.move_on_after(0.5):
        async for chunk in provider.stream(chat_request()):
            received.append(chunk)
    assert 0 < len(received) < 50
    await wait_for_disconnect(fake_ollama)
    assert fake_ollama.disconnects == ["/api/chat"]


async def test_cancelling_a_chat_closes_the_connection(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    fake_ollama.token_delay = 0.2
    with anyio.move_on_after(0.3) as scope:
        await provider.chat(chat_request())
    assert scope.cancelled_caught
    await wait_for_disconnect(fake_ollama)
    assert fake_ollama.disconnects == ["/api/chat"]


# --- legacy completions ----------------------------------------------------------------


async def test_complete_uses_generate_in_raw_mode(provider: OllamaProvider, fake_ollama: FakeOllama) -> None:
    request = decode_completion_request(
        {"model": "llama3.2", "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0}
    )
    response = await provider.complete(request)
    assert response.choices[0].text == "Hello from the "
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and (
        response.usage.prompt_tokens,
        response.usage.completion_tokens,
    ) == (5, 3)
    body = sent_body(fake_ollama, "/api/generate")
    assert body["raw"] is True and body["prompt"] == "Once upon a time"
    assert body["options"] == {"temperature": 0.0, "num_predict": 3}


@pytest.mark.parametrize(("field", "value"), [("keep_alive", [1]), ("keep_alive", True), ("think", 3)])
async def test_a_top_level_field_of_the_wrong_type_is_the_requests_400(
    provider: OllamaProvider, fake_ollama: FakeOllama, field: str, value: object
) -> None:
    """The client library checks these before sending a completion: its error read as a
    broken daemon (a 502 that cooled the deployment down for everyone)."""
    for request in (
        decode_completion_request({"model": "llama3.2", "prompt": "Once", field: value}),
        decode_chat_request(
            {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], field: value}
        ),
    ):
        with pytest.raises(InvalidRequestError) as refused:
            await (provider.complete(request) if hasattr(request, "prompt") else provider.chat(request))
        assert refused.value.param == field
    assert not [path for path, _ in fake_ollama.requests if path in ("/api/generate", "/api/chat")]


async def test_complete_passes_ollamas_fields_and_logprobs(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    request = decode_completion_request(
        {
            "model": "llama3.2",
            "prompt": "Once",
            "max_tokens": 2,
            "keep_alive": "1m",
            "think": False,
            "logprobs": 2,
        }
    )
    response = await provider.complete(request)
    body = sent_body(fake_ollama, "/api/generate")
    assert (body["keep_alive"], body["think"], body["logprobs"], body["top_logprobs"]) == (
        "1m",
        False,
        True,
        2,
    )
    parsed = Completion.model_validate(json.loads(msgspec.json.encode(response)))
    logprobs = parsed.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["Hello ", "from "]
    assert logprobs.token_logprobs == [-0.1, -0.2]
    assert logprobs.top_logprobs == [{"Hello ": -0.1, "alt1": -1.1}, {"from ": -0.2, "alt1": -1.2}]
    assert logprobs.text_offset == [0, 6]
    await provider.complete(
        decode_completion_request({"model": "llama3.2", "prompt": "Once", "reasoning_effort": "none"})
    )
    assert sent_body(fake_ollama, "/api/generate")["think"] is False


async def test_stream_complete_logprobs_count_offsets_across_chunks(provider: OllamaProvider) -> None:
    request = decode_completion_request(
        {"model": "llama3.2", "prompt": "Once", "max_tokens": 3, "logprobs": 0}
    )
    chunks = [c async for c in provider.stream_complete(request)]
    logprobs = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].text]
    assert [lp["text_offset"] if lp else None for lp in logprobs] == [[0], [6], [11]]
    assert [lp["top_logprobs"] if lp else None for lp in logprobs] == [
        [{"Hello ": -0.1}],
        [{"from ": -0.2}],
        [{"the ": pytest.approx(-0.3)}],
    ]


async def test_stream_complete(provider: OllamaProvider) -> None:
    request = decode_completion_request({"model": "llama3.2", "prompt": "Once", "max_tokens": 100})
    chunks = [c async for c in provider.stream_complete(request)]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


# --- models, health, capabilities ------------------------------------------------------


async def test_list_models_from_tags(provider: OllamaProvider) -> None:
    cards = await provider.list_models()
    assert [c.id for c in cards] == ["llama3.2:latest", "qwen2.5:0.5b"]
    assert all(c.owned_by == "ollama" and c.created > 0 for c in cards)


async def test_health_and_capabilities(provider: OllamaProvider, fake_ollama: FakeOllama) -> None:
    health = await provider.health()
    assert health.ok is True and health.latency_ms is not None
    # start() asked /api/show: the fake's model has tools, no vision, an 8k context.
    caps = provider.capabilities
    assert (caps.tools, caps.vision, caps.completions, caps.max_context) == (True, False, True, 8192)


async def test_provider_builds_from_config_keys(ollama_url: str) -> None:
    p = OllamaProvider.from_config(
        "llama3.2", {"host": ollama_url, "keep_alive": "5m", "model_options": {"num_ctx": 4096}}
    )
    assert isinstance(p, OllamaProvider) and p.host == ollama_url
    from llmrouter.errors import ConfigError

    with pytest.raises(ConfigError):
        OllamaProvider.from_config("llama3.2", {"hots": ollama_url}, path="models[0].deployments[0]")
