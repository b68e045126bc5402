"""The vllm provider against a real vLLM engine serving a tiny random-weight Llama."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

from llmrouter.errors import ContextWindowExceededError, InvalidRequestError, UnsupportedFeatureError
from llmrouter.types import ChatChunk, ChatRequest, decode_chat_request, decode_completion_request

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.anyio,
    pytest.mark.skipif(
        find_spec("vllm") is None, reason="vLLM is not installed here (scripts/setup-vllm-env)"
    ),
]

TINY_MAX_MODEL_LEN = 512  # the tiny_vllm fixture's max_model_len

QUESTION = [{"role": "user", "content": "The quick brown fox"}]


def chat_request(provider: Any, **fields: Any) -> ChatRequest:
    body: dict[str, Any] = {"model": provider.model, "messages": QUESTION, "temperature": 0, **fields}
    return decode_chat_request(body)


async def collect(stream: Any) -> list[ChatChunk]:
    return [chunk async for chunk in stream]


def stream_text(chunks: list[Any], index: int = 0) -> str:
    return "".join(
        choice.delta.content or "" for chunk in chunks for choice in chunk.choices if choice.index == index
    )


def expected_prompt_tokens(model_dir: Path, messages: list[dict[str, str]]) -> int:
    """The prompt length as transformers counts it, independently of the provider."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


async def test_health_and_engine_stats(tiny_vllm: Any) -> None:
    health = await tiny_vllm.health()
    assert health.ok, health.detail
    stats = tiny_vllm.engine_stats()
    assert stats["state"] == "running"
    assert stats["in_flight"] == 0
    assert 0.0 <= stats["kv_cache_usage"] <= 1.0
    assert {"requests_running", "requests_waiting", "unfinished_requests"} <= stats.keys()
    assert tiny_vllm.capabilities.max_context == TINY_MAX_MODEL_LEN
    assert [card.id for card in await tiny_vllm.list_models()] == [tiny_vllm.model]


async def test_chat_usage_and_length_finish(tiny_vllm: Any, tiny_llama_dir: Path) -> None:
    response = await tiny_vllm.chat(
        chat_request(tiny_vllm, max_tokens=8, extra_body_ignored=1, ignore_eos=True)
    )
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant" and choice.message.content
    usage = response.usage
    assert usage is not None and not usage.estimated
    assert usage.completion_tokens == 8
    assert usage.prompt_tokens == expected_prompt_tokens(tiny_llama_dir, QUESTION)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_stream_matches_chat_and_ends_with_usage(tiny_vllm: Any) -> None:
    request = chat_request(tiny_vllm, max_tokens=12, ignore_eos=True)
    whole = await tiny_vllm.chat(request)
    chunks = await collect(
        tiny_vllm.stream(chat_request(tiny_vllm, max_tokens=12, ignore_eos=True, stream=True))
    )
    assert stream_text(chunks) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(choice.delta.role is None for chunk in chunks[1:] for choice in chunk.choices)
    reasons = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert reasons == ["length"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({chunk.id for chunk in chunks}) == 1


async def test_stop_string_ends_with_stop(tiny_vllm: Any) -> None:
    free = await tiny_vllm.chat(chat_request(tiny_vllm, max_tokens=24, ignore_eos=True))
    text = free.choices[0].message.content
    # A stop string from the middle of the greedy answer: the answer must end just before it.
    candidates = [
        i for i in range(4, len(text) - 3) if text[i : i + 3].strip() and text[i : i + 3].isprintable()
    ]
    assert candidates, f"no usable stop string in {text!r}"
    stop = text[candidates[0] : candidates[0] + 3]
    stopped = await tiny_vllm.chat(chat_request(tiny_vllm, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.find(stop)]
    assert stopped.usage.completion_tokens < 24


async def test_seed_makes_sampling_reproducible(tiny_vllm: Any) -> None:
    def request(seed: int) -> ChatRequest:
        return chat_request(tiny_vllm, temperature=1.5, seed=seed, max_tokens=16, ignore_eos=True)

    first = await tiny_vllm.chat(request(1234))
    second = await tiny_vllm.chat(request(1234))
    assert first.choices[0].message.content == second.choices[0].message.content
    others = {(await tiny_vllm.chat(request(seed))).choices[0].message.content for seed in range(5)}
    # Sampling at temperature 1.5 with five other seeds cannot all land on one answer
    # unless the seed is ignored or sampling is greedy.
    assert len(others | {first.choices[0].message.content}) > 1


async def test_n_choices_and_usage(tiny_vllm: Any) -> None:
    response = await tiny_vllm.chat(
        chat_request(tiny_vllm, n=2, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True)
    )
    assert [choice.index for choice in response.choices] == [0, 1]
    assert response.usage.completion_tokens == 10
    chunks = await collect(
        tiny_vllm.stream(
            chat_request(tiny_vllm, n=2, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True, stream=True)
        )
    )
    assert stream_text(chunks, 0) and stream_text(chunks, 1)
    assert chunks[-1].usage.completion_tokens == 10


async def test_logprobs(tiny_vllm: Any) -> None:
    response = await tiny_vllm.chat(
        chat_request(tiny_vllm, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=3)
    )
    content = response.choices[0].logprobs["content"]
    assert len(content) == 6
    for entry in content:
        assert len(entry["top_logprobs"]) == 3
        # Greedy decoding picks the most likely token.
        assert entry["logprob"] == pytest.approx(max(top["logprob"] for top in entry["top_logprobs"]))


async def test_json_schema_constrains_output(tiny_vllm: Any) -> None:
    schema = {"type": "string", "enum": ["yes", "no"]}
    response = await tiny_vllm.chat(
        chat_request(
            tiny_vllm,
            max_tokens=10,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        )
    )
    assert response.choices[0].message.content in {'"yes"', '"no"'}
    assert response.choices[0].finish_reason == "stop"


async def test_context_window_exceeded_is_a_400(tiny_vllm: Any) -> None:
    with pytest.raises(ContextWindowExceededError) as caught:
        await tiny_vllm.chat(chat_request(tiny_vllm, max_tokens=TINY_MAX_MODEL_LEN))
    assert caught.value.http_status == 400
    long_prompt = [{"role": "user", "content": "fox " * (2 * TINY_MAX_MODEL_LEN)}]
    with pytest.raises(ContextWindowExceededError):
        await collect(tiny_vllm.stream(chat_request(tiny_vllm, messages=long_prompt, stream=True)))


async def test_unsupported_input_is_rejected(tiny_vllm: Any) -> None:
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    with pytest.raises(UnsupportedFeatureError):
        await tiny_vllm.chat(chat_request(tiny_vllm, messages=image))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(UnsupportedFeatureError):
        await tiny_vllm.chat(chat_request(tiny_vllm, tools=tools))
    with pytest.raises(InvalidRequestError):
        await tiny_vllm.chat(chat_request(tiny_vllm, logit_bias={"not-a-token": 1.0}))


@pytest.mark.parametrize("prompt", [[], [-1], [10**9]])
async def test_a_prompt_the_model_cannot_take_is_a_400(tiny_vllm: Any, prompt: list[int]) -> None:
    # A negative token id failed in vLLM's engine client (OverflowError), not as a 400.
    request = decode_completion_request({"model": tiny_vllm.model, "prompt": prompt, "max_tokens": 2})
    with pytest.raises(InvalidRequestError) as caught:
        await tiny_vllm.complete(request)
    assert (caught.value.http_status, caught.value.param) == (400, "prompt")
    assert (await tiny_vllm.chat(chat_request(tiny_vllm, max_tokens=2))).usage is not None


@pytest.mark.parametrize("token", ["-1", "1000000000"])
async def test_a_logit_bias_outside_the_vocabulary_is_a_400(tiny_vllm: Any, token: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await tiny_vllm.chat(chat_request(tiny_vllm, max_tokens=2, logit_bias={token: 1.0}))
    assert (caught.value.http_status, caught.value.param) == (400, "logit_bias")
    assert (await tiny_vllm.chat(chat_request(tiny_vllm, max_tokens=2))).usage is not None


async def test_no_default_max_tokens_runs_to_context_or_eos(tiny_vllm: Any) -> None:
    response = await tiny_vllm.chat(chat_request(tiny_vllm, ignore_eos=True))
    usage = response.usage
    assert response.choices[0].finish_reason == "length"
    assert usage.total_tokens == TINY_MAX_MODEL_LEN


async def test_completions(tiny_vllm: Any) -> None:
    request = decode_completion_request(
        {
            "model": tiny_vllm.model,
            "prompt": "The quick brown",
            "max_tokens": 5,
            "temperature": 0,
            "ignore_eos": True,
        }
    )
    response = await tiny_vllm.complete(request)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5
    echoed = decode_completion_request(
        {
            "model": tiny_vllm.model,
            "prompt": "The quick brown",
            "max_tokens": 5,
            "temperature": 0,
            "ignore_eos": True,
            "echo": True,
            "stream": True,
            "logprobs": 2,
        }
    )
    chunks = [chunk async for chunk in tiny_vllm.stream_complete(echoed)]
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == "The quick brown" + response.choices[0].text
    assert chunks[-1].usage.prompt_tokens == response.usage.prompt_tokens
    tokens = [
        t
        for chunk in chunks
        for choice in chunk.choices
        if choice.logprobs
        for t in choice.logprobs["tokens"]
    ]
    assert len(tokens) == 5


async def test_prefix_cache_hits_are_reported_as_cached_tokens(tiny_vllm: Any) -> None:
    messages = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 12}]
    first = await tiny_vllm.chat(chat_request(tiny_vllm, messages=messages, max_tokens=2))
    second = await tiny_vllm.chat(chat_request(tiny_vllm, messages=messages, max_tokens=2))
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    # The second request reuses the first one's KV-cache blocks (whole blocks only).
    assert 0 < second.usage.cached_tokens < second.usage.prompt_tokens
    assert tiny_vllm.engine_stats()["prefix_cache_hits"] > 0
