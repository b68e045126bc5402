import msgspec
import pytest

from llmrouter.chunking import chunks_from_response, response_from_chunks
from llmrouter.errors import InvalidRequestError, UnsupportedFeatureError
from llmrouter.types import (
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatMessage,
    ChatResponse,
    CompletionChunk,
    CompletionResponse,
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


def _message_written(response: ChatResponse) -> dict:
    return msgspec.json.decode(msgspec.json.encode(response))["choices"][0]["message"]


def test_an_answers_message_writes_content_and_refusal_null_however_it_was_made():
    # OpenAI writes both keys, null when absent; clients test `message.content === null`.
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    message = {"role": "assistant", "tool_calls": [call]}
    raw = {"id": "x", "choices": [{"index": 0, "message": message}]}
    decoded = msgspec.json.decode(msgspec.json.encode(raw), type=ChatResponse)
    expected = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
    assert _message_written(decoded) == expected
    assembled = response_from_chunks(chunks_from_response(decoded))
    assert _message_written(assembled) == expected
    cached = msgspec.json.decode(msgspec.json.encode(decoded), type=ChatResponse)
    assert _message_written(cached) == expected and cached == decoded
    built = ChatResponse(choices=[ChatChoice(message=ChatMessage(role="assistant", content="hi"))])
    assert _message_written(built) == {"role": "assistant", "content": "hi", "refusal": None}
    assert _message_written(ChatResponse(choices=[ChatChoice()])) == {
        "role": "assistant",
        "content": None,
        "refusal": None,
    }
    # A request's messages still leave them out.
    request = decode_chat_request({"model": "m", "messages": [message]})
    assert request_to_wire(request)["messages"] == [{"role": "assistant", "tool_calls": [call]}]


def test_a_message_made_an_answers_keeps_every_field():
    fields = {
        "role": "assistant",
        "content": "hi",
        "name": "n",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        "tool_call_id": "c0",
        "function_call": {"name": "g", "arguments": "{}"},
        "audio": {"id": "a"},
        "refusal": "no",
        "reasoning_content": "r1",
        "reasoning": "r2",
        "reasoning_details": [{"type": "reasoning.text"}],
        "annotations": [{"type": "url_citation"}],
        "cache_control": {"type": "ephemeral"},
        "prefix": True,
    }
    assert set(fields) == set(ChatMessage.__struct_fields__), "a new field: set it here"
    message = msgspec.convert(fields, ChatMessage)
    answer = ChatChoice(message=message).message
    assert isinstance(answer, AssistantMessage)
    assert msgspec.structs.asdict(answer) == msgspec.structs.asdict(message)


def test_the_service_tier_of_an_answer_is_relayed_and_kept_through_chunking():
    raw = b'{"id":"x","service_tier":"flex","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}]}'
    response = msgspec.json.decode(raw, type=ChatResponse)
    assert msgspec.json.decode(msgspec.json.encode(response))["service_tier"] == "flex"
    chunks = chunks_from_response(response)
    assert {chunk.service_tier for chunk in chunks} == {"flex"}
    assert response_from_chunks(chunks).service_tier == "flex"
    chunk = msgspec.json.decode(b'{"id":"x","service_tier":"default","choices":[]}', type=ChatChunk)
    assert msgspec.json.decode(msgspec.json.encode(chunk))["service_tier"] == "default"
    for kind in (CompletionResponse, CompletionChunk):
        completion = msgspec.json.decode(b'{"id":"x","service_tier":"flex","choices":[]}', type=kind)
        assert msgspec.json.decode(msgspec.json.encode(completion))["service_tier"] == "flex"
    # An upstream that sends none (vLLM, Ollama) gets no key added.
    plain = msgspec.json.decode(b'{"id":"x","choices":[]}', type=ChatResponse)
    assert b"service_tier" not in msgspec.json.encode(plain)
    assert b"service_tier" not in msgspec.json.encode(response_from_chunks(chunks_from_response(plain)))


@pytest.mark.parametrize("as_dict", [False, True], ids=["struct", "dict"])
def test_an_answers_message_sent_back_is_a_requests_message(as_dict):
    # A library caller appends the answer's message to its conversation: it went upstream
    # with "content": null and "refusal": null (and, in a dict, was refused).
    from llmrouter.router import _chat_request
    from llmrouter.types import AssistantMessage, ChatChoice, ChatMessage, ChatRequest, request_to_wire

    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    answer = ChatChoice(message=ChatMessage(role="assistant", tool_calls=[call])).message
    assert type(answer) is AssistantMessage
    messages = [
        {"role": "user", "content": "x"},
        answer,
        {"role": "tool", "content": "1", "tool_call_id": "c"},
    ]
    if as_dict:
        request = _chat_request({"model": "m", "messages": messages})
    else:
        request = _chat_request(
            ChatRequest(model="m", messages=[msgspec.convert(messages[0], ChatMessage), answer])
        )
    assert {type(m) for m in request.messages} == {ChatMessage}
    assert request_to_wire(request)["messages"][1] == {"role": "assistant", "tool_calls": [call]}
