"""A custom (free-form) tool call in the history: refused, not rendered by the chat template
as a call of a nameless function (a custom call's ``.function`` is a placeholder)."""

from __future__ import annotations

import pytest

from llmrouter.errors import UnsupportedFeatureError
from llmrouter.types import decode_chat_request

_wire = pytest.importorskip(
    "llmrouter_vllm._wire",
    reason="llmrouter-vllm is not installed here: pip install --no-deps -e providers/vllm",
)


def test_a_custom_call_in_the_history_is_refused_by_its_place() -> None:
    request = decode_chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "list the files"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                        {"id": "c1", "type": "custom", "custom": {"name": "shell", "input": "ls"}},
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
            ],
        }
    )
    with pytest.raises(UnsupportedFeatureError) as info:
        _wire.template_messages(request)
    assert info.value.param == "messages[1].tool_calls[1]"
    assert info.value.http_status == 400
