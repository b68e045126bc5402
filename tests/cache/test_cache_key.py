"""The cache key: what changes the answer changes the key, nothing else does."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from llmrouter.cache import cache_key
from llmrouter.types import ChatRequest, decode_chat_request

BASE: dict[str, Any] = {
    "model": "gpt",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "temperature": 0,
    "tools": [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {}, "b": {}}}},
        }
    ],
}


def key_of(body: dict[str, Any], group: str | None = "g", namespace: str | None = None) -> str:
    return cache_key(decode_chat_request(body), group, namespace=namespace)


def test_same_request_same_key_and_format() -> None:
    key = key_of(BASE)
    assert key == key_of(dict(BASE))
    assert key.startswith("chat:") and len(key) == len("chat:") + 64


@pytest.mark.parametrize(
    "noise",
    [
        {"user": "alice"},
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"n": 1},
    ],
)
def test_fields_that_do_not_change_the_answer_are_ignored(noise: dict[str, Any]) -> None:
    assert key_of({**BASE, **noise}) == key_of(BASE)


def test_dict_order_does_not_matter() -> None:
    reordered = {
        **BASE,
        "tools": [
            {
                "function": {"parameters": {"properties": {"b": {}, "a": {}}, "type": "object"}, "name": "f"},
                "type": "function",
            }
        ],
    }
    assert key_of(reordered) == key_of(BASE)
    assert key_of({"temperature": 0, **{k: v for k, v in BASE.items() if k != "temperature"}}) == key_of(BASE)


def test_equivalent_spellings_share_a_key() -> None:
    assert key_of({**BASE, "stop": "END"}) == key_of({**BASE, "stop": ["END"]})
    assert key_of({**BASE, "max_tokens": 5}) == key_of({**BASE, "max_completion_tokens": 5})
    assert key_of({**BASE, "temperature": 0}) == key_of({**BASE, "temperature": 0.0})


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "Hi!"}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi", "name": "bob"},
            ]
        },
        {"tools": None},
        {"tool_choice": "required"},
        {"temperature": 0.5},
        {"top_p": 0.5},
        {"seed": 1},
        {"max_tokens": 5},
        {"n": 2},
        {"stop": ["x"]},
        {"presence_penalty": 0.1},
        {"frequency_penalty": 0.1},
        {"logit_bias": {"50256": -100}},
        {"logprobs": True},
        {"response_format": {"type": "json_object"}},
        {"reasoning_effort": "high"},  # unknown fields pass through to upstream, so they count
    ],
)
def test_answer_changing_fields_change_the_key(change: dict[str, Any]) -> None:
    assert key_of({**BASE, **change}) != key_of(BASE)


def test_model_group_not_requested_name() -> None:
    # Two aliases of one group share answers; the same name in two groups does not.
    assert key_of({**BASE, "model": "alias-a"}, "g") == key_of({**BASE, "model": "alias-b"}, "g")
    assert key_of(BASE, "g1") != key_of(BASE, "g2")
    assert key_of({**BASE, "model": "m"}, None) == key_of({**BASE, "model": "m"}, "m")


def test_namespace_separates_keys_without_revealing_them() -> None:
    plain = key_of(BASE)
    alice, bob = key_of(BASE, namespace="key_alice"), key_of(BASE, namespace="key_bob")
    assert len({plain, alice, bob}) == 3
    assert alice == key_of(BASE, namespace="key_alice")
    assert "key_alice" not in alice and alice.endswith(plain)


def test_a_library_callers_int_sampling_numbers_key_as_over_http() -> None:
    # HTTP bodies decode these fields as floats; a ChatRequest built in Python may hold ints.
    numbers = {"temperature": 0, "top_p": 1, "presence_penalty": -1, "frequency_penalty": 2}
    body = {**BASE, **numbers}
    request = msgspec.structs.replace(decode_chat_request(body), **numbers)
    assert type(request.temperature) is int
    assert cache_key(request, "g") == key_of(body)


def test_request_struct_and_dict_agree() -> None:
    request = ChatRequest(
        model="gpt",
        messages=decode_chat_request(BASE).messages,
        temperature=0.0,
        tools=decode_chat_request(BASE).tools,
    )
    assert cache_key(request, "g") == key_of(BASE)
