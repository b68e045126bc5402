"""``llmrouter bench --providers transformers``: both paths generate the same answer and
the rows say what was measured (a smoke test of the figures, not a timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from llmrouter_transformers import TransformersOptions, TransformersProvider
from llmrouter_transformers.bench import TransformersBench, open_bench

from llmrouter.bench.providers import PROMPT, measure_subject
from llmrouter.types import decode_chat_request

pytestmark = pytest.mark.anyio


async def test_raw_generate_gives_the_providers_answer(tiny_llama: Path) -> None:
    # The raw path must do the same work as the provider: the same prompt ids, greedy.
    provider = TransformersProvider("tiny", TransformersOptions(path=str(tiny_llama)))
    async with provider:
        subject = TransformersBench(provider, "tiny")
        rows, ttft = await anyio.to_thread.run_sync(subject.generate, 2, 12)
        answer = await provider.chat(
            decode_chat_request(
                {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": PROMPT}],
                    "max_tokens": 12,
                    "temperature": 0,
                }
            )
        )
        assert rows[0] == rows[1] and len(rows[0]) == answer.usage.completion_tokens and ttft > 0
        text = provider.engine.tokenizer.decode(rows[0], skip_special_tokens=True)
        # The provider leaves out a character the 12th token left incomplete.
        assert text.rstrip("\ufffd") == answer.choices[0].message.content and text


async def test_both_paths_are_measured_at_each_concurrency(tiny_llama: Path) -> None:
    async with open_bench(str(tiny_llama)) as subject:
        raw, ours = await subject.raw(3, 5), await subject.provider(3, 5)
        assert [s.tokens for s in raw] == [s.tokens for s in ours] == [5, 5, 5]
        assert all(s.ttft > 0 for s in raw + ours)
        rows = await measure_subject("transformers", subject, [1, 2], tokens=6, requests=2, rounds=2)
    assert [(r.path, r.concurrency) for r in rows] == [
        ("raw", 1),
        ("provider", 1),
        ("raw", 2),
        ("provider", 2),
    ]
    for row in rows:
        assert row.tokens_per_s > 0 and row.ttft_p50_ms > 0 and len(row.rounds_tokens_per_s) == 2
        assert row.model.endswith("(cpu, float32)") and row.tokens_per_request == 6
    raw_2, ours_2 = rows[2], rows[3]
    assert ours_2.vs_raw == pytest.approx(ours_2.tokens_per_s / raw_2.tokens_per_s - 1)
    assert raw_2.vs_c1 == pytest.approx(raw_2.tokens_per_s / rows[0].tokens_per_s)


def test_the_command_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "providers.json"
    run = subprocess.run(
        [sys.executable, "-m", "llmrouter.cli", "bench", "--no-gateway", "--providers", "transformers",
         "--provider-model", "tiny", "--provider-concurrency", "1,2", "--provider-tokens", "4",
         "--provider-requests", "2", "--rounds", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "tokens/s" in run.stdout and "ttft p50 ms" in run.stdout
    assert "transformers: tiny random Llama (cpu, float32)" in run.stdout
    assert "gateway[" not in run.stdout and "4/4" in run.stderr  # the progress bar's last step
    rows = json.loads(out.read_text())["providers"]
    assert [(r["path"], r["concurrency"]) for r in rows] == [
        ("raw", 1),
        ("provider", 1),
        ("raw", 2),
        ("provider", 2),
    ]
    assert all(r["tokens_per_s"] > 0 and 0 < r["tokens_per_request"] <= 4 for r in rows)
