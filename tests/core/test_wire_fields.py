"""What a client sends inside messages, tool calls and tools reaches the upstream: the
fields llmrouter models, provider extensions among them (a tool call's ``extra_content``, a
tool's ``cache_control``, a message's ``prefix``); other keys there are dropped. Decoded
requests are plain instances of the public types. Valid OpenAI input (refusal parts,
custom tools) is taken, and a refusal names its field."""

from __future__ import annotations

import copy
import json
import pickle
import time
from typing import Any

import msgspec
import pytest

from llmrouter.cache.key import cache_key
from llmrouter.chunking import chunks_from_response, response_from_chunks
from llmrouter.errors import InvalidRequestError
from llmrouter.openai_compat import _chat_texts, _message_text
from llmrouter.tokens import count_messages, count_text, tools_text
from llmrouter.types import (
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    CustomCall,
    CustomToolDefinition,
    FunctionCall,
    FunctionDefinition,
    RefusalPart,
    Tool,
    ToolCall,
    ToolCallDelta,
    decode_chat_request,
    decode_completion_request,
    request_to_wire,
)

USER = {"role": "user", "content": "hi"}
SIGNATURE = {"google": {"thought_signature": "c2ln"}}


def wire(body: dict[str, Any]) -> dict[str, Any]:
    """What an upstream gets for ``body``: the request encoded, both ways the remote
    provider encodes one (the Struct itself, or request_to_wire when it has extra fields)."""
    request = decode_chat_request(json.dumps(body).encode())
    sent: dict[str, Any] = json.loads(msgspec.json.encode(request_to_wire(request)))
    if not request.extra:
        assert json.loads(msgspec.json.encode(request)) == sent
    return sent


# --- bug 1: fields inside messages, tool calls and tools -------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param(
            [
                USER,
                {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
                {"role": "function", "name": "f", "content": "42"},
            ],
            id="legacy-function-call",
        ),
        pytest.param([USER, {"role": "assistant", "audio": {"id": "audio_abc"}}, USER], id="assistant-audio"),
        pytest.param(
            [
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "now", "arguments": ""}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
            ],
            id="empty-arguments",
        ),
        pytest.param(
            [
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "now", "arguments": "{}"},
                            "extra_content": SIGNATURE,
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
            ],
            id="gemini-thought-signature",
        ),
        pytest.param(
            [USER, {"role": "assistant", "content": "```python\n", "prefix": True}],
            id="assistant-prefill",
        ),
    ],
)
def test_what_a_message_holds_reaches_the_upstream(messages: list[dict[str, Any]]) -> None:
    body = {"model": "m", "messages": messages}
    sent = wire(body)
    assert sent["messages"] == [{k: v for k, v in m.items() if v is not None} for m in messages]


def test_a_tools_cache_control_is_kept_with_the_top_level_extra_fields() -> None:
    tools = [
        {"type": "function", "function": {"name": "f"}, "cache_control": {"type": "ephemeral"}},
        {"type": "function", "function": {"name": "g"}},
    ]
    sent = wire({"model": "m", "messages": [USER], "tools": tools, "top_k": 5})
    assert sent["tools"] == tools and sent["top_k"] == 5


def test_other_keys_inside_messages_tool_calls_and_tools_are_dropped() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "now", "arguments": "{}"}}
    tool = {"type": "function", "function": {"name": "now"}}
    sent = wire(
        {
            "model": "m",
            "messages": [
                {**USER, "x_trace": 1},
                {"role": "assistant", "tool_calls": [{**call, "x_call": {"a": 1}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "12:00", "x_note": None},
            ],
            "tools": [{**tool, "x_tool": True}],
        }
    )
    assert sent["messages"] == [
        USER,
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
    ]
    assert sent["tools"] == [tool]


def test_decoded_requests_are_the_public_types_equal_to_hand_built_ones() -> None:
    body = {
        "model": "m",
        "messages": [
            {**USER, "x_unknown": 1},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "function": {"name": "f"}, "extra_content": SIGNATURE},
                    {"id": "c2", "type": "custom", "custom": {"name": "g", "input": "x"}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            {"role": "assistant", "content": "Sure", "prefix": True},
        ],
        "tools": [
            {"type": "function", "function": {"name": "f"}, "cache_control": {"type": "ephemeral"}},
            {"type": "custom", "custom": {"name": "g"}},
        ],
    }
    request = decode_chat_request(json.dumps(body).encode())
    built = ChatRequest(
        model="m",
        messages=[
            ChatMessage(role="user", content="hi"),
            ChatMessage(
                role="assistant",
                tool_calls=[
                    ToolCall(id="c1", function=FunctionCall(name="f"), extra_content=SIGNATURE),
                    ToolCall(id="c2", type="custom", custom=CustomCall(name="g", input="x")),
                ],
            ),
            ChatMessage(role="tool", tool_call_id="c1", content="ok"),
            ChatMessage(role="assistant", content="Sure", prefix=True),
        ],
        tools=[
            Tool(function=FunctionDefinition(name="f"), cache_control={"type": "ephemeral"}),
            Tool(type="custom", custom=CustomToolDefinition(name="g")),
        ],
    )
    assert request == built and type(request) is ChatRequest
    assert {type(m) for m in request.messages} == {ChatMessage}
    assert msgspec.convert(request, ChatRequest) is request
    # Pickled and copied (a custom call's placeholder .function stays the one, never encoded).
    for again in (pickle.loads(pickle.dumps(request)), copy.deepcopy(request)):
        assert again == request
        assert msgspec.json.encode(again) == msgspec.json.encode(request)
    assert cache_key(request) == cache_key(built)


def test_a_dict_that_holds_decoded_messages_and_built_tool_calls_is_a_request() -> None:
    earlier = decode_chat_request({"model": "m", "messages": [USER]})
    call = ToolCall(id="c1", function=FunctionCall(name="f", arguments="{}"))
    request = decode_chat_request(
        {
            "model": "m",
            "messages": [
                *earlier.messages,
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            ],
            "tools": [Tool(function=FunctionDefinition(name="f"))],
        }
    )
    assert request.messages[0] == ChatMessage(role="user", content="hi")
    assert request.messages[1].tool_calls == [call]
    # Built structs are held to the checks too.
    with pytest.raises(InvalidRequestError) as info:
        decode_chat_request({"model": "m", "messages": [USER], "tools": [Tool()]})
    assert info.value.param == "tools[0].function"


def test_a_message_with_many_unknown_keys_decodes_in_linear_time() -> None:
    many = {f"k{i:07d}": 1 for i in range(100_000)}
    body = json.dumps({"model": "m", "messages": [{**USER, **many}]}).encode()
    start = time.perf_counter()
    request = decode_chat_request(body)
    assert time.perf_counter() - start < 0.5
    assert msgspec.json.encode(request.messages[0]) == b'{"role":"user","content":"hi"}'


def test_cache_keys_of_equal_requests_stay_equal_and_modeled_fields_count() -> None:
    def key(messages: list[dict[str, Any]]) -> str:
        return cache_key(decode_chat_request({"model": "m", "messages": messages}))

    call = {"id": "c1", "type": "function", "function": {"name": "now", "arguments": ""}}
    untyped = {"id": "c1", "function": {"name": "now"}}  # type and arguments left to their defaults
    assert key([USER, {"role": "assistant", "tool_calls": [call]}]) == key(
        [USER, {"role": "assistant", "tool_calls": [untyped]}]
    )
    assert key([{**USER, "a": 1}]) == key([USER])  # dropped, so not sent: the same question
    signed = {**call, "extra_content": SIGNATURE}
    assert key([USER, {"role": "assistant", "tool_calls": [signed]}]) != key(
        [USER, {"role": "assistant", "tool_calls": [call]}]
    )
    assert key([USER, {"role": "assistant", "content": "a", "prefix": True}]) != key(
        [USER, {"role": "assistant", "content": "a"}]
    )


def test_upstream_answers_relay_a_tool_calls_extra_content() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    raw = {
        "id": "x",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "tool_calls": [{**call, "extra_content": SIGNATURE}]},
            }
        ],
    }
    response = msgspec.json.decode(json.dumps(raw).encode(), type=ChatResponse)
    relayed = json.loads(msgspec.json.encode(response))["choices"][0]["message"]["tool_calls"]
    assert relayed == [{**call, "extra_content": SIGNATURE}]
    # Streamed: the delta relays it, the assembled answer keeps it, and its replay too.
    delta = {"index": 0, **call, "extra_content": SIGNATURE}
    chunk = msgspec.json.decode(
        json.dumps({"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": [delta]}}]}), type=ChatChunk
    )
    assert json.loads(msgspec.json.encode(chunk))["choices"][0]["delta"]["tool_calls"] == [delta]
    assembled = response_from_chunks([chunk])
    assert assembled.choices[0].message.tool_calls == [
        ToolCall(id="c1", function=FunctionCall(name="f", arguments="{}"), extra_content=SIGNATURE)
    ]
    assert response_from_chunks(chunks_from_response(assembled)) == assembled
    # A delta without it has no key (ToolCallDelta writes every other field).
    plain = msgspec.json.decode(json.dumps({"index": 0, **call}), type=ToolCallDelta)
    assert b"extra_content" not in msgspec.json.encode(plain)


def test_upstream_answers_relay_function_call_and_audio() -> None:
    raw: dict[str, Any] = {
        "id": "x",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "function_call": {"name": "f", "arguments": ""},
                    "audio": {"id": "audio_1", "transcript": "hi", "expires_at": 1},
                },
                "finish_reason": "function_call",
            }
        ],
    }
    response = msgspec.json.decode(json.dumps(raw).encode(), type=ChatResponse)
    relayed = json.loads(msgspec.json.encode(response))["choices"][0]["message"]
    assert relayed == {**raw["choices"][0]["message"], "refusal": None}


# --- bug 2: refusal parts and custom tools ----------------------------------------------


def test_refusal_parts_custom_tools_and_custom_calls_are_taken_and_passed_on() -> None:
    messages = [
        USER,
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "type": "custom", "custom": {"name": "code_exec", "input": "print(1)"}},
                {"id": "c2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
    ]
    tools = [
        {
            "type": "custom",
            "custom": {"name": "code_exec", "description": "runs code", "format": {"type": "text"}},
        },
        {"type": "function", "function": {"name": "now"}},
    ]
    body = {
        "model": "m",
        "messages": messages,
        "tools": tools,
        "tool_choice": {"type": "custom", "custom": {"name": "code_exec"}},
    }
    assert wire(body) == body
    request = decode_chat_request(body)
    assert isinstance(request.messages[1].content[0], RefusalPart)  # type: ignore[index]
    # Code that reads .function of any tool or call does not fail on a custom one.
    custom_call = request.messages[2].tool_calls[0]  # type: ignore[index]
    assert custom_call.custom.input == "print(1)" and custom_call.function.name == ""  # type: ignore[union-attr]
    assert request.tools[0].function.name == "" and count_messages(request.messages) > 0  # type: ignore[index]
    assert json.loads(tools_text(request.tools)) == tools


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "custom"}]}, "tools[0].custom"),
        ({"tools": [{"type": "custom", "custom": {}}]}, "tools[0].custom.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}, "x": 1}, {"type": "custom"}]},
            "tools[1].custom",
        ),
        (
            {"messages": [USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "custom"}]}]},
            "messages[1].tool_calls[0].custom",
        ),
        (
            {"messages": [USER, {"role": "assistant", "tool_calls": [{"id": "c"}]}]},
            "messages[1].tool_calls[0].function",
        ),
    ],
)
def test_a_tool_or_call_without_the_part_its_type_names_is_400(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_chat_request({"model": "m", "messages": [USER], **body})
    assert info.value.param == param and info.value.http_status == 400


def test_custom_tool_calls_survive_a_stream_and_its_replay() -> None:
    deltas = [
        {"index": 0, "id": "c1", "type": "custom", "custom": {"name": "code_exec", "input": "print("}},
        {"index": 0, "custom": {"input": "1)"}},
    ]
    chunks = [
        msgspec.json.decode(
            json.dumps({"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": [d]}}]}), type=ChatChunk
        )
        for d in deltas
    ]
    response = response_from_chunks(chunks)
    (call,) = response.choices[0].message.tool_calls or []
    assert call == ToolCall(id="c1", type="custom", custom=call.custom) and call.custom is not None
    assert (call.custom.name, call.custom.input) == ("code_exec", "print(1)")
    assert json.loads(msgspec.json.encode(call)) == {
        "id": "c1",
        "custom": {"name": "code_exec", "input": "print(1)"},
        "type": "custom",
    }
    replayed = [c for chunk in chunks_from_response(response) for c in chunk.choices if c.delta.tool_calls]
    delta = json.loads(msgspec.json.encode(replayed[0].delta.tool_calls[0]))  # type: ignore[index]
    assert delta["type"] == "custom" and delta["custom"] == {"name": "code_exec", "input": "print(1)"}
    # A function call's delta has no "custom" key.
    function_delta = msgspec.json.decode(b'{"index":0,"function":{"arguments":"{}"}}', type=ToolCallDelta)
    assert b"custom" not in msgspec.json.encode(function_delta)


def test_tool_types_encode_their_type_and_leave_placeholders_out() -> None:
    call = ToolCall(id="c", function=FunctionCall(name="f"))
    assert json.loads(msgspec.json.encode(call)) == {
        "id": "c",
        "function": {"name": "f", "arguments": ""},
        "type": "function",
    }
    tool = Tool(type="custom", custom=CustomToolDefinition(name="t"))
    assert json.loads(msgspec.json.encode(tool)) == {"custom": {"name": "t"}, "type": "custom"}
    assert json.loads(msgspec.json.encode(Tool(function=FunctionDefinition(name="f")))) == {
        "function": {"name": "f"},
        "type": "function",
    }


# --- bug 3: the error names the field -----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b'{"model":"m"}', "messages", "missing_required_parameter"),
        (b'{"messages":[{"role":"user","content":"x"}]}', "model", "missing_required_parameter"),
        (
            b'{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","tool_calls":[{"type":"function","function":{"name":"f","arguments":"{}"}}]}]}',
            "messages[1].tool_calls[0].id",
            "missing_required_parameter",
        ),
        (
            b'{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":{"50256":"x"}}',
            "logit_bias",
            None,
        ),
        (
            b'{"model":"m","messages":[{"role":"user","content":"x"}],"presence_penalty":1e400}',
            "presence_penalty",
            None,
        ),
        (
            b'{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"a":1e400}}}]}',
            "tools[0].function.parameters",
            None,
        ),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"top_k":1e400}', None, None),
        (
            b'{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":{"50256":101}}',
            "logit_bias",
            None,
        ),
        (
            b'{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":{"abc":1}}',
            "logit_bias",
            None,
        ),
        (
            b'{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":{"5\\n":1}}',
            "logit_bias",
            None,
        ),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"top_logprobs":3}', "top_logprobs", None),
        (
            b'{"model":"m","messages":[{"role":"user","content":"x"}],"logprobs":false,"top_logprobs":0}',
            "top_logprobs",
            None,
        ),
        (
            b'{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema"}}',
            "response_format.json_schema",
            "missing_required_parameter",
        ),
    ],
)
def test_chat_errors_name_the_field(body: bytes, param: str | None, code: str | None) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_chat_request(body)
    assert (info.value.param, info.value.code) == (param, code)
    assert "`$[" not in str(info.value)  # no path that names nothing
    if code is not None:
        assert str(info.value) == f"Missing required parameter: '{param}'."


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "m"}, "prompt", "missing_required_parameter"),
        ({"model": "m", "prompt": ["a", 1]}, "prompt", None),
        ({"model": "m", "prompt": [[1], "a"]}, "prompt", None),
        ({"model": "m", "prompt": "a", "logit_bias": {"1": -101}}, "logit_bias", None),
        ({"model": "m", "prompt": "a", "logit_bias": {"a": 1}}, "logit_bias", None),
    ],
)
def test_completion_errors_name_the_field(body: dict[str, Any], param: str, code: str | None) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_completion_request(json.dumps(body).encode())
    assert (info.value.param, info.value.code) == (param, code)


def test_the_bounds_of_logit_bias_and_logprobs_are_taken() -> None:
    body = {
        "model": "m",
        "messages": [USER],
        "logit_bias": {"50256": -100, "1": 100},
        "logprobs": True,
        "top_logprobs": 20,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s"}},
    }
    assert request_to_wire(decode_chat_request(body)) == body


def test_custom_calls_and_function_call_count_as_tokens() -> None:
    code = "x = 1\n" * 200

    def prompt(call: dict[str, Any]) -> int:
        request = decode_chat_request({"model": "m", "messages": [USER, {"role": "assistant", **call}]})
        return count_messages(request.messages, "gpt-4o")

    function = prompt({"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": code}}]})
    custom = prompt({"tool_calls": [{"id": "c", "type": "custom", "custom": {"name": "f", "input": code}}]})
    legacy = prompt({"function_call": {"name": "f", "arguments": code}})
    assert function == custom == legacy > count_text(code, "gpt-4o")

    # An answer that reported no usage is counted from its text, custom calls included.
    answer = msgspec.json.decode(
        json.dumps(
            {
                "choices": [
                    {
                        "message": {
                            "role": "assistant",
                            "tool_calls": [
                                {"id": "c", "type": "custom", "custom": {"name": "f", "input": code}}
                            ],
                            "function_call": {"name": "g", "arguments": "{}"},
                        }
                    }
                ]
            }
        ),
        type=ChatResponse,
    )
    assert _message_text(answer.choices[0].message) == "f" + code + "g{}"
    texts: list[str] = []
    for delta in (
        {"tool_calls": [{"index": 0, "id": "c", "type": "custom", "custom": {"name": "f", "input": code}}]},
        {"function_call": {"name": "g", "arguments": "{}"}},
    ):
        chunk = msgspec.json.decode(json.dumps({"choices": [{"index": 0, "delta": delta}]}), type=ChatChunk)
        _chat_texts(chunk, texts)
    assert "".join(texts) == "f" + code + "g{}"


def test_a_delta_with_custom_null_is_taken() -> None:
    raw = {
        "id": "x",
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "a",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                            "custom": None,
                        }
                    ]
                },
            }
        ],
    }
    chunk = msgspec.json.decode(json.dumps(raw).encode(), type=ChatChunk)
    (call,) = chunk.choices[0].delta.tool_calls or []
    assert call.custom is None
    assert response_from_chunks([chunk]).choices[0].message.tool_calls == [
        ToolCall(id="a", function=FunctionCall(name="f", arguments="{}"))
    ]


def test_a_cached_function_call_and_audio_are_replayed_as_a_stream() -> None:
    raw = {
        "id": "x",
        "choices": [
            {
                "index": 0,
                "finish_reason": "function_call",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "function_call": {"name": "f", "arguments": "{}"},
                    "audio": {"id": "au_1", "data": "AAA", "transcript": "hi", "expires_at": 1},
                },
            }
        ],
    }
    response = msgspec.json.decode(json.dumps(raw).encode(), type=ChatResponse)
    chunks = chunks_from_response(response)
    delta = json.loads(msgspec.json.encode(chunks[0]))["choices"][0]["delta"]
    assert delta["function_call"] == {"name": "f", "arguments": "{}"} and delta["audio"]["id"] == "au_1"
    assert response_from_chunks(chunks) == response


def test_streamed_function_call_and_audio_pieces_are_assembled() -> None:
    deltas: list[dict[str, Any]] = [
        {
            "role": "assistant",
            "function_call": {"name": "f", "arguments": ""},
            "audio": {"id": "au_1", "transcript": "he"},
        },
        {"function_call": {"arguments": '{"a":'}, "audio": {"transcript": "llo", "data": "AA"}},
        {"function_call": {"arguments": " 1}"}, "audio": {"data": "BB", "expires_at": 9}},
    ]
    chunks = [
        msgspec.json.decode(json.dumps({"id": "x", "choices": [{"index": 0, "delta": d}]}), type=ChatChunk)
        for d in deltas
    ]
    message = response_from_chunks(chunks).choices[0].message
    assert message.function_call == FunctionCall(name="f", arguments='{"a": 1}')
    assert message.audio == {"id": "au_1", "transcript": "hello", "data": "AABB", "expires_at": 9}
    assert message.content is None
