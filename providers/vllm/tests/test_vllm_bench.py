"""``llmrouter bench --providers vllm`` on the session's tiny engine: both paths generate
exactly the tokens asked for, and the rows say what was measured."""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.anyio,
    pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed (scripts/setup-vllm-env)"),
]


async def test_both_paths_generate_the_tokens_asked_for(tiny_vllm: Any) -> None:
    from llmrouter_vllm.bench import VLLMBench

    from llmrouter.bench.providers import measure_subject

    subject = VLLMBench(tiny_vllm, "tiny")
    raw, ours = await subject.raw(3, 7), await subject.provider(3, 7)
    # ignore_eos: exactly max_tokens each, whatever the random weights pick.
    assert [s.tokens for s in raw] == [s.tokens for s in ours] == [7, 7, 7]
    assert all(s.ttft > 0 for s in raw + ours)
    rows = await measure_subject("vllm", subject, [1, 2], tokens=5, requests=2, rounds=2)
    assert [(r.path, r.concurrency) for r in rows] == [
        ("raw", 1),
        ("provider", 1),
        ("raw", 2),
        ("provider", 2),
    ]
    assert all(r.tokens_per_request == 5 and r.tokens_per_s > 0 and r.ttft_p50_ms > 0 for r in rows)
    assert rows[1].vs_raw == pytest.approx(rows[1].tokens_per_s / rows[0].tokens_per_s - 1)
    assert rows[0].model == "tiny (vLLM)"
