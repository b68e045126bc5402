import msgspec
import pytest

from llmrouter.errors import InvalidRequestError, UnsupportedFeatureError
from llmrouter.types import (
    ChatChunk,
    ChatResponse,
    ImagePart,
    TextPart,
    decode_chat_request,
    decode_completion_request,
    error_param,
    message_text,
    request_to_wire,
)


def test_unknown_fields_are_kept_and_passed_on():
    request = decode_chat_request(
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"top_k":5,"repetition_penalty":1.1}'
    )
    assert request.extra == {"top_k": 5, "repetition_penalty": 1.1}
    wire = request_to_wire(request)
    assert wire["top_k"] == 5 and wire["repetition_penalty"] == 1.1
    assert "__extra__" not in wire and "extra" not in wire


def test_content_parts_are_tagged_by_type():
    request = decode_chat_request(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is "},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                        {"type": "text", "text": "this?"},
                    ],
                }
            ],
        }
    )
    parts = request.messages[0].content
    assert isinstance(parts[0], TextPart) and isinstance(parts[1], ImagePart)
    assert message_text(request.messages[0]) == "What is this?"


def test_tools_response_format_stop_seed_n_user_round_trip():
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "s", "schema": {"type": "object"}},
        },
        "stop": ["\n", "END"],
        "seed": 7,
        "n": 2,
        "user": "u1",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = decode_chat_request(body)
    assert request.stop_list == ["\n", "END"]
    assert request_to_wire(request) == body


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model":"m","messages":[]}', "messages"),
        (b'{"model":"m","messages":[{"role":"wizard","content":"x"}]}', "messages[0].role"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}', "temperature"),
        (
            b'{"model":"m","messages":[{"role":"user","content":[{"type":"video","url":"x"}]}]}',
            "messages[0].content[0].type",
        ),
        (b'{"messages":[{"role":"user","content":"x"}]}', "model"),
        (
            b'{"model":"m","messages":[{"role":"user","content":"x"},{"role":"tool","content":"42"}]}',
            "messages[1].tool_call_id",
        ),
        (
            b'{"model":"m","messages":[{"role":"tool","content":"42","tool_call_id":""}]}',
            "messages[0].tool_call_id",
        ),
    ],
)
def test_invalid_requests_name_the_field(body, param):
    with pytest.raises(InvalidRequestError) as info:
        decode_chat_request(body)
    assert info.value.http_status == 400
    if param is not None:
        assert info.value.param == param


def test_a_field_the_schema_does_not_know_is_named_as_the_param():
    class Inner(msgspec.Struct, forbid_unknown_fields=True):
        size: int = 0

    class Outer(msgspec.Struct, forbid_unknown_fields=True):
        inner: Inner

    for body, param in (
        (b'{"colour":1,"inner":{}}', "colour"),
        (b'{"inner":{"colour":1}}', "inner.colour"),
        (b'{"inner":{"size":"big"}}', "inner.size"),
    ):
        with pytest.raises(msgspec.ValidationError) as info:
            msgspec.json.decode(body, type=Outer)
        assert error_param(info.value) == param


def test_not_json_and_not_object():
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        decode_chat_request(b"{nope")
    with pytest.raises(InvalidRequestError, match="not valid JSON: Input data was truncated"):
        decode_chat_request(b'{"model": "m", "messages": [')
    # msgspec calls a lone high surrogate "truncated" too; the message says what it is.
    with pytest.raises(InvalidRequestError, match="unpaired UTF-16 surrogate"):
        decode_chat_request('{"model": "m", "messages": [{"role": "user", "content": "\\ud83d!"}]}')
    with pytest.raises(InvalidRequestError, match="JSON object"):
        decode_chat_request(b"[1, 2]")


def test_a_request_of_another_type_is_a_type_error_that_says_what_a_request_is():
    with pytest.raises(
        TypeError, match="a request is a dict, JSON text or bytes, or a ChatRequest, not list"
    ):
        decode_chat_request([{"role": "user", "content": "hi"}])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="or a CompletionRequest, not int"):
        decode_completion_request(5)  # type: ignore[arg-type]


def test_completion_request_defaults_and_prompt_forms():
    request = decode_completion_request({"model": "m", "prompt": "Once upon"})
    assert request.max_tokens == 16 and request.prompt_text == "Once upon"
    tokens = decode_completion_request({"model": "m", "prompt": [1, 2, 3]})
    with pytest.raises(UnsupportedFeatureError):
        _ = tokens.prompt_text  # a deployment that takes only text prompts raises it
    assert (tokens.prompt_count, request.prompt_count) == (1, 1)
    assert decode_completion_request({"model": "m", "prompt": [[1], [2], [3]]}).prompt_count == 3
    with pytest.raises(InvalidRequestError, match="prompt"):
        decode_completion_request({"model": "m", "prompt": ["a", 1]})


def test_upstream_responses_decode_tolerantly():
    raw = (
        b'{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"hi","some_vendor_field":1},"finish_reason":"stop",'
        b'"stop_reason":null}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4,'
        b'"cost":0.0002},"service_tier":"default"}'
    )
    response = msgspec.json.decode(raw, type=ChatResponse)
    assert response.choices[0].message.content == "hi"
    assert response.usage.cost == 0.0002
    chunk = msgspec.json.decode(b'{"choices":[{"delta":{"content":"a"},"index":0}]}', type=ChatChunk)
    assert chunk.choices[0].delta.content == "a"
