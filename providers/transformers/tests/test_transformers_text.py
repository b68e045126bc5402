"""Incremental detokenisation (multi-byte characters) and stop strings, without a model."""

from __future__ import annotations

from pathlib import Path

import pytest
from llmrouter_transformers.sampling import SamplingParams, TokenSampler
from llmrouter_transformers.text import IncrementalDecoder, StopStringFilter

MULTI_BYTE = "Emoji 😀🚀 then 日本語のテキスト, 한국어, café — done 👍🏽."


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def test_multi_byte_characters_stream_whole(tokenizer) -> None:
    ids = tokenizer(MULTI_BYTE, add_special_tokens=False)["input_ids"]
    # The byte-level vocabulary splits characters over several tokens: the case under test.
    partial = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert partial, "expected tokens that hold only part of a character"
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == MULTI_BYTE
    assert "" in deltas, "mid-character tokens must produce no text"


@pytest.mark.parametrize("whole", ["ok 😀🚀", "🎉", "日本語のテキスト"])
def test_a_character_the_last_token_leaves_incomplete_is_dropped(tokenizer, whole: str) -> None:
    """Before: ``flush`` returned its bytes as U+FFFD, a broken character in the last chunk."""
    ids = tokenizer(whole, add_special_tokens=False)["input_ids"][:-1]
    assert tokenizer.decode(ids).endswith("\ufffd"), "expected the cut to split a character"
    decoder = IncrementalDecoder(tokenizer)
    text = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert text == tokenizer.decode(ids).rstrip("\ufffd")
    assert whole.startswith(text)


def test_special_tokens_are_left_out(tokenizer) -> None:
    ids = tokenizer("hi<|im_end|>", add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "hi"


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    flt = StopStringFilter(stops)
    out = "".join(flt.feed(p) for p in pieces)
    return out + flt.flush(), flt.stopped


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        (["Hello ", "wor", "ld END more"], ("Hello world ", True)),
        (["Hello E", "N", "D"], ("Hello ", True)),
        (["Hello EN", "x"], ("Hello ENx", False)),
        (["no stop here"], ("no stop here", False)),
        (["ab", "STOPx"], ("ab", True)),
    ],
)
def test_stop_strings_split_across_pieces(pieces: list[str], expected: tuple[str, bool]) -> None:
    assert feed_all(["END", "STOP"], pieces) == expected


def test_partial_stop_string_is_held_back() -> None:
    flt = StopStringFilter(["###"])
    assert flt.feed("answer #") == "answer "
    assert flt.feed("#") == ""
    assert flt.feed("x") == "##x"
    assert flt.feed("1 ###") == "1 "
    assert flt.stopped and flt.feed("more") == "" and flt.flush() == ""


def test_earliest_stop_string_wins() -> None:
    assert feed_all(["b", "a"], ["xyz ab"]) == ("xyz ", True)


def test_penalties_and_bias_follow_openai() -> None:
    import torch

    params = SamplingParams(
        max_new_tokens=4, temperature=0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: 2.0}
    )
    sampler = TokenSampler(params, torch.device("cpu"))
    for token in (1, 1, 2):
        sampler.record(token)
    adjusted = sampler.adjust(torch.zeros(5))
    assert adjusted.tolist() == [0.0, -(0.5 + 2 * 0.25), -(0.5 + 0.25), 2.0, 0.0]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    import torch

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = set()
    for seed in range(200):
        sampler = TokenSampler(
            SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.7, seed=seed), torch.device("cpu")
        )
        seen.add(sampler.choose(logits))
    assert seen == {0, 1}


def test_top_p_zero_keeps_the_most_likely_token() -> None:
    # Before: every token was cut, torch.multinomial raised, and the engine failed every
    # request decoding in the same batch.
    import torch

    logits = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    for seed in range(20):
        sampler = TokenSampler(
            SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.0, seed=seed), torch.device("cpu")
        )
        assert sampler.choose(logits) == 1
