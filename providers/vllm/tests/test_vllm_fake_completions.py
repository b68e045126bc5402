"""Legacy ``/v1/completions`` on a scripted fake engine (no vLLM needed): logprobs and
their ``text_offset`` with echo and with text vLLM holds back, the context error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fake_vllm_engine import CompletionOutput, FakeBackend, FakeEngine, Logprob, RequestOutput

from llmrouter.errors import ContextWindowExceededError
from llmrouter.types import CompletionChunk, decode_completion_request

pytest.importorskip(
    "llmrouter_vllm", reason="llmrouter-vllm is not installed here: pip install --no-deps -e providers/vllm"
)


pytestmark = pytest.mark.anyio

MakeProvider = Callable[[FakeBackend], Any]
PROMPT = "Hello"


def position(char: str) -> dict[int, Logprob]:
    """One position's logprobs: the chosen token (one character) alone."""
    return {ord(char): Logprob(-0.5, 1, char)}


def held_back_text(request_id: str, params: Any) -> list[RequestOutput]:
    """``XYZ`` in three tokens; streamed, Y's text is held back and sent with Z's, as vLLM
    does while the text may still be the start of a stop string."""
    tokens = [ord(char) for char in "XYZ"]
    if not params.stream:
        whole = CompletionOutput(0, "XYZ", tokens, [position(c) for c in "XYZ"], "length")
        return [RequestOutput(request_id, [whole], True)]
    return [
        RequestOutput(request_id, [CompletionOutput(0, "X", tokens[:1], [position("X")])], False),
        RequestOutput(request_id, [CompletionOutput(0, "", tokens[1:2], [position("Y")])], False),
        RequestOutput(request_id, [CompletionOutput(0, "YZ", tokens[2:], [position("Z")], "length")], True),
    ]


def completion(**fields: Any) -> Any:
    return decode_completion_request(
        {"model": "m", "prompt": PROMPT, "max_tokens": 3, "logprobs": 1, **fields}
    )


def streamed(chunks: list[CompletionChunk]) -> tuple[str, list[str], list[int]]:
    """The text, logprob tokens and text offsets of a stream's choice 0."""
    text, tokens, offsets = "", [], []
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs:
                tokens += choice.logprobs["tokens"]
                offsets += choice.logprobs["text_offset"]
    return text, tokens, offsets


async def test_echo_offsets_start_after_the_prompt(fake_vllm: MakeProvider) -> None:
    async with fake_vllm(FakeBackend(FakeEngine(held_back_text))) as provider:
        response = await provider.complete(completion(echo=True))
    choice = response.choices[0]
    assert choice.text == "HelloXYZ"
    assert choice.logprobs["text_offset"] == [5, 6, 7]
    assert [choice.text[offset] for offset in choice.logprobs["text_offset"]] == choice.logprobs["tokens"]


async def test_a_streamed_token_whose_text_is_held_back_keeps_its_logprobs(fake_vllm: MakeProvider) -> None:
    async with fake_vllm(FakeBackend(FakeEngine(held_back_text))) as provider:
        chunks = [chunk async for chunk in provider.stream_complete(completion(stream=True))]
    text, tokens, offsets = streamed(chunks)
    assert text == "XYZ"
    assert tokens == ["X", "Y", "Z"]
    assert offsets == [0, 1, 2]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_streamed_echo_offsets_start_after_the_prompt(fake_vllm: MakeProvider) -> None:
    async with fake_vllm(FakeBackend(FakeEngine(held_back_text))) as provider:
        chunks = [chunk async for chunk in provider.stream_complete(completion(stream=True, echo=True))]
    text, tokens, offsets = streamed(chunks)
    assert text == "HelloXYZ"
    assert offsets == [5, 6, 7]
    assert [text[offset] for offset in offsets] == tokens


async def test_a_prompt_too_long_names_the_prompt(fake_vllm: MakeProvider) -> None:
    async with fake_vllm(FakeBackend(FakeEngine(max_model_len=8))) as provider:
        with pytest.raises(ContextWindowExceededError) as caught:
            await provider.complete(completion(prompt="a prompt longer than the context"))
    assert caught.value.param == "prompt"
