"""Through the service to the fake upstream: the fields a client puts inside messages and
tools arrive as sent (keys llmrouter does not model there are dropped), an upstream's
``extra_content`` reaches the client, valid OpenAI input is not refused, and a refusal names
its field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest

from llmrouter.config import parse_config
from llmrouter.server import create_app
from llmrouter.testing.serve import serve_app
from llmrouter.testing.upstream import FakeUpstream

USER = {"role": "user", "content": "hi"}


@pytest.fixture(scope="module")
def client(upstream: FakeUpstream) -> Iterator[httpx.Client]:
    config = parse_config(
        {
            "models": [
                {
                    "name": "mock-gpt",
                    "deployments": [
                        {"provider": "remote", "model": "mock-gpt", "base_url": upstream.base_url}
                    ],
                }
            ],
            "router": {"retry": {"attempts": 0}},
        },
        env={},
    )
    with serve_app(create_app(config)) as url, httpx.Client(base_url=url, timeout=20) as http:
        yield http


@pytest.mark.parametrize("stream", [False, True])
def test_messages_and_tools_reach_the_upstream_as_sent(
    client: httpx.Client, fake: FakeUpstream, stream: bool
) -> None:
    messages: list[dict[str, Any]] = [
        USER,
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "f", "content": "42"},
        {"role": "assistant", "audio": {"id": "audio_abc"}},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "now", "arguments": ""},
                    "extra_content": {"google": {"thought_signature": "c2ln"}},
                },
                {"id": "c2", "type": "custom", "custom": {"name": "code_exec", "input": "print(1)"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
        {"role": "tool", "tool_call_id": "c2", "content": "1", "x_note": None},
        USER,
        {"role": "assistant", "content": "It is", "prefix": True},
    ]
    tools = [
        {"type": "function", "function": {"name": "now"}, "cache_control": {"type": "ephemeral"}},
        {"type": "custom", "custom": {"name": "code_exec", "description": "runs code"}},
    ]
    body = {
        "model": "mock-gpt",
        "messages": messages,
        "tools": tools,
        "functions": [{"name": "f"}],
        "stream": stream,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    sent = fake.last_request.json
    expected = [{k: v for k, v in m.items() if v is not None} for m in messages]  # x_note dropped
    assert sent["messages"] == expected
    assert sent["tools"] == tools and sent["functions"] == [{"name": "f"}]


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/v1/chat/completions", {"model": "mock-gpt"}, "messages", "missing_required_parameter"),
        ("/v1/completions", {"model": "mock-gpt"}, "prompt", "missing_required_parameter"),
        (
            "/v1/chat/completions",
            {
                "model": "mock-gpt",
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
                    },
                ],
            },
            "messages[1].tool_calls[0].id",
            "missing_required_parameter",
        ),
        ("/v1/completions", {"model": "mock-gpt", "prompt": ["a", 1]}, "prompt", None),
        (
            "/v1/chat/completions",
            {"model": "mock-gpt", "messages": [USER], "logit_bias": {"50256": "x"}},
            "logit_bias",
            None,
        ),
        (
            "/v1/chat/completions",
            {"model": "mock-gpt", "messages": [USER], "logit_bias": {"abc": 1}},
            "logit_bias",
            None,
        ),
        (
            "/v1/chat/completions",
            {"model": "mock-gpt", "messages": [USER], "top_logprobs": 3},
            "top_logprobs",
            None,
        ),
        (
            "/v1/chat/completions",
            {"model": "mock-gpt", "messages": [USER], "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
            "missing_required_parameter",
        ),
    ],
)
def test_a_refusal_names_the_field(
    client: httpx.Client, fake: FakeUpstream, path: str, body: dict[str, Any], param: str, code: str | None
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert not fake.requests


def test_a_number_out_of_range_is_named_by_its_field(client: httpx.Client) -> None:
    body = b'{"model":"mock-gpt","messages":[{"role":"user","content":"hi"}],"presence_penalty":1e400}'
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "presence_penalty" and "$[" not in error["message"]


# --- an upstream's extra_content (Gemini's thought signatures) reaches the client ----------

_SIGNED_CALL = {
    "id": "c1",
    "type": "function",
    "function": {"name": "now", "arguments": "{}"},
    "extra_content": {"google": {"thought_signature": "c2ln"}},
}


async def _gemini_like(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An upstream that answers every chat request with a call that carries a signature."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[-1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    kind = b"application/json"
    if scope["path"].endswith("/models"):
        text = msgspec.json.encode({"object": "list", "data": [{"id": "gem", "object": "model"}]})
    elif json.loads(body or b"{}").get("stream"):
        head: dict[str, Any] = {"id": "g", "object": "chat.completion.chunk", "model": "gem"}
        delta = {"role": "assistant", "tool_calls": [{"index": 0, **_SIGNED_CALL}]}
        events = [
            {**head, "choices": [{"index": 0, "delta": delta}]},
            {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        ]
        text = b"".join(b"data: " + msgspec.json.encode(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        kind = b"text/event-stream"
    else:
        message = {"role": "assistant", "content": None, "tool_calls": [_SIGNED_CALL]}
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
        text = msgspec.json.encode(
            {"id": "g", "object": "chat.completion", "model": "gem", "choices": [choice], "usage": usage}
        )
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
    await send({"type": "http.response.body", "body": text})


@pytest.fixture(scope="module")
def gemini_client() -> Iterator[httpx.Client]:
    with serve_app(_gemini_like) as upstream_url:
        config = parse_config(
            {
                "models": [
                    {
                        "name": "gem",
                        "deployments": [
                            {"provider": "remote", "model": "gem", "base_url": f"{upstream_url}/v1"}
                        ],
                    }
                ],
                "router": {"retry": {"attempts": 0}},
            },
            env={},
        )
        with serve_app(create_app(config)) as url, httpx.Client(base_url=url, timeout=20) as http:
            yield http


def test_an_upstreams_thought_signature_reaches_the_client(gemini_client: httpx.Client) -> None:
    body = {"model": "gem", "messages": [USER]}
    response = gemini_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["tool_calls"] == [_SIGNED_CALL]

    streamed = gemini_client.post("/v1/chat/completions", json={**body, "stream": True})
    assert streamed.status_code == 200, streamed.text
    calls = [
        call
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
        for choice in json.loads(line[6:])["choices"]
        for call in choice["delta"].get("tool_calls") or ()
    ]
    assert [call["extra_content"] for call in calls] == [_SIGNED_CALL["extra_content"]]


def test_an_answer_with_tool_calls_has_content_and_refusal_null(gemini_client: httpx.Client) -> None:
    # The upstream leaves refusal out; OpenAI writes both keys, and clients test them.
    response = gemini_client.post("/v1/chat/completions", json={"model": "gem", "messages": [USER]})
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "refusal": None, "tool_calls": [_SIGNED_CALL]}
