"""Through the service to the fake upstream: what a client puts inside messages and tools
arrives as sent, valid OpenAI input is not refused, and a refusal names its field."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
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
    expected = [{k: v for k, v in m.items() if v is not None or k == "x_note"} for m in messages]
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
