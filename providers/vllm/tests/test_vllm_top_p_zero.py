"""``top_p: 0``, which OpenAI takes (only the likeliest token), was refused by vLLM with a 400."""

from __future__ import annotations

from importlib.util import find_spec

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        find_spec("vllm") is None, reason="vLLM is not installed here (scripts/setup-vllm-env)"
    ),
]


def _params(top_p: float | None) -> object:
    from llmrouter_vllm._engine import make_sampling_params

    return make_sampling_params(
        max_tokens=8,
        n=None,
        temperature=1.0,
        top_p=top_p,
        stop=[],
        seed=None,
        presence_penalty=None,
        frequency_penalty=None,
        logit_bias=None,
        vocabulary=512,
        logprobs=None,
        structured_outputs=None,
        extra={},
        stream=False,
    )


def test_top_p_zero_is_the_smallest_nucleus_not_a_refusal() -> None:
    assert 0 < _params(0.0).top_p <= 1e-6  # type: ignore[attr-defined]
    assert _params(0.5).top_p == 0.5  # type: ignore[attr-defined]
