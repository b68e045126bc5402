"""Custom (free-form) tools: Ollama has none. A custom tool, or a custom call in the
history, was sent as a function with an empty name (its ``.function`` is a placeholder)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from fake_ollama import FakeOllama
from llmrouter_ollama import OllamaOptions, OllamaProvider
from llmrouter_ollama._translate import build_chat_body

from llmrouter.errors import UnsupportedFeatureError
from llmrouter.types import decode_chat_request

pytestmark = pytest.mark.anyio

FUNCTION_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CUSTOM_TOOL = {"type": "custom", "custom": {"name": "shell", "description": "runs a command"}}
CUSTOM_CALL = {"id": "c1", "type": "custom", "custom": {"name": "shell", "input": "ls"}}
FUNCTION_CALL = {"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def _request(**fields: Any) -> Any:
    return decode_chat_request(
        {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def _body(request: Any) -> dict[str, Any]:
    return build_chat_body(request, "llama3.2", stream=False, default_options={}, keep_alive=None)


@pytest.fixture
async def provider(ollama_url: str) -> AsyncIterator[OllamaProvider]:
    async with OllamaProvider("llama3.2", OllamaOptions(host=ollama_url)) as p:
        yield p


def test_a_custom_tool_is_refused_by_its_index() -> None:
    with pytest.raises(UnsupportedFeatureError) as info:
        _body(_request(tools=[FUNCTION_TOOL, CUSTOM_TOOL]))
    assert info.value.param == "tools[1]"
    assert info.value.http_status == 400


def test_a_custom_call_in_the_history_is_refused_by_its_place() -> None:
    messages = [
        {"role": "user", "content": "list the files"},
        {"role": "assistant", "tool_calls": [FUNCTION_CALL, CUSTOM_CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
    ]
    with pytest.raises(UnsupportedFeatureError) as info:
        _body(_request(messages=messages))
    assert info.value.param == "messages[1].tool_calls[1]"


def test_function_tools_and_calls_still_go_through() -> None:
    messages = [
        {"role": "user", "content": "call f"},
        {"role": "assistant", "tool_calls": [FUNCTION_CALL]},
        {"role": "tool", "tool_call_id": "c0", "content": "done"},
    ]
    body = _body(_request(messages=messages, tools=[FUNCTION_TOOL]))
    assert body["tools"][0]["function"]["name"] == "f"
    assert body["messages"][1]["tool_calls"] == [{"function": {"name": "f", "arguments": {}}}]
    assert body["messages"][2]["tool_name"] == "f"


def test_custom_tools_not_offered_with_tool_choice_none_are_not_sent() -> None:
    assert "tools" not in _body(_request(tools=[CUSTOM_TOOL], tool_choice="none"))


async def test_the_daemon_is_not_called(provider: OllamaProvider, fake_ollama: FakeOllama) -> None:
    with pytest.raises(UnsupportedFeatureError):
        await provider.chat(_request(tools=[CUSTOM_TOOL]))
    with pytest.raises(UnsupportedFeatureError):
        await provider.chat(
            _request(
                messages=[
                    {"role": "assistant", "tool_calls": [CUSTOM_CALL]},
                    {"role": "user", "content": "hi"},
                ]
            )
        )
    assert [p for p, _ in fake_ollama.requests if p == "/api/chat"] == []
