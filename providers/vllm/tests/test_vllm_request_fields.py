"""Request fields the vllm provider must honour or refuse, never drop: tool calling in all
its spellings, and vLLM's own structured-output fields (no vLLM needed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fake_vllm_engine import FakeBackend

from llmrouter.errors import InvalidRequestError, UnsupportedFeatureError
from llmrouter.types import decode_chat_request, decode_completion_request

_wire = pytest.importorskip(
    "llmrouter_vllm._wire",
    reason="llmrouter-vllm is not installed here: pip install --no-deps -e providers/vllm",
)


MakeProvider = Callable[[FakeBackend], Any]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}}


def chat(**fields: Any) -> Any:
    return decode_chat_request(
        {"model": "m", "messages": [{"role": "user", "content": "weather?"}], **fields}
    )


FUNCTION = {"name": "get_weather", "parameters": {"type": "object"}}
TOOL = {"type": "function", "function": FUNCTION}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [TOOL]}, "tools"),
        ({"tools": [TOOL], "tool_choice": "auto"}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
        ({"functions": [FUNCTION]}, "functions"),
        ({"functions": [FUNCTION], "function_call": {"name": "get_weather"}}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"function_call": {"name": "get_weather"}}, "function_call"),
    ],
)
def test_tool_calling_in_any_field_is_refused_by_its_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(UnsupportedFeatureError) as caught:
        _wire.check_chat_features(chat(**fields))
    assert caught.value.param == param and caught.value.http_status == 400


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"tools": [TOOL], "tool_choice": "none"},
        {"tool_choice": "none"},
        {"tool_choice": "auto"},
        {"functions": [FUNCTION], "function_call": "none"},
        {"function_call": "none"},
    ],
)
def test_asking_for_no_call_is_fine(fields: dict[str, Any]) -> None:
    _wire.check_chat_features(chat(**fields))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, {"json_object": True}),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}},
            {"json": SCHEMA},
        ),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, {"choice": ["yes", "no"]}),
        ({"guided_json": SCHEMA}, {"json": SCHEMA}),
        ({"guided_regex": "[0-9]+"}, {"regex": "[0-9]+"}),
        ({"guided_choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
        ({"guided_grammar": "root ::= 'a'"}, {"grammar": "root ::= 'a'"}),
        (
            {"response_format": {"type": "json_object"}, "guided_whitespace_pattern": " ?"},
            {"json_object": True, "whitespace_pattern": " ?"},
        ),
    ],
)
def test_structured_output_fields_map_onto_vllms(fields: dict[str, Any], expected: Any) -> None:
    request = chat(**fields)
    assert _wire.structured_outputs(request.response_format, request.extra) == expected


@pytest.mark.parametrize(
    ("fields", "error", "param"),
    [
        (
            {"response_format": {"type": "json_object"}, "guided_choice": ["a"]},
            InvalidRequestError,
            "guided_choice",
        ),
        ({"guided_json": SCHEMA, "guided_regex": "a"}, InvalidRequestError, "guided_regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, InvalidRequestError, "structured_outputs"),
        ({"structured_outputs": "json"}, InvalidRequestError, "structured_outputs"),
        ({"structured_outputs": {}}, InvalidRequestError, "structured_outputs"),
        ({"guided_whitespace_pattern": " ?"}, InvalidRequestError, "guided_whitespace_pattern"),
        ({"guided_decoding_backend": "xgrammar"}, UnsupportedFeatureError, "guided_decoding_backend"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
            InvalidRequestError,
            "response_format",
        ),
    ],
)
def test_structured_output_fields_vllm_would_not_take_are_refused(
    fields: dict[str, Any], error: type[Exception], param: str
) -> None:
    request = chat(**fields)
    with pytest.raises(error) as caught:
        _wire.structured_outputs(request.response_format, request.extra)
    assert caught.value.param == param  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_guided_fields_reach_the_engine_as_structured_outputs(fake_vllm: MakeProvider) -> None:
    backend = FakeBackend()
    async with fake_vllm(backend) as provider:
        await provider.chat(chat(guided_choice=["yes", "no"]))
        completion = decode_completion_request({"model": "m", "prompt": "n=", "guided_regex": "[0-9]+"})
        await provider.complete(completion)
        with pytest.raises(UnsupportedFeatureError):
            await provider.chat(chat(functions=[FUNCTION]))
    assert [call["structured_outputs"] for call in backend.sampling] == [
        {"choice": ["yes", "no"]},
        {"regex": "[0-9]+"},
    ]


@pytest.mark.anyio
async def test_a_request_for_an_audio_answer_is_refused(fake_vllm: MakeProvider) -> None:
    """Before: answered in text, to a client that asked for audio."""
    backend = FakeBackend()
    async with fake_vllm(backend) as provider:
        with pytest.raises(UnsupportedFeatureError) as caught:
            await provider.chat(chat(modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}))
        assert caught.value.param == "modalities" and caught.value.http_status == 400
        await provider.chat(chat(modalities=["text"]))
    assert len(backend.sampling) == 1, "the refused request never reached the engine"
