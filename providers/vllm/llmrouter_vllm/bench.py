"""The vLLM provider in ``llmrouter bench --providers vllm``.

One engine, started through :class:`~llmrouter_vllm.VLLMProvider`, serves both paths:
*raw* streams the prompt's token ids straight through the engine's ``generate`` (vLLM's
``AsyncLLM``), *provider* streams the same chat through the provider (chat template,
wire chunks, usage, abort bookkeeping). Both are greedy with ``ignore_eos``, so every
request generates exactly the tokens asked for. Run it in the vLLM environment
(``scripts/setup-vllm-env``).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from llmrouter.bench.providers import MESSAGES, Sample, chat_request, stream_sample, together
from llmrouter_vllm.options import VLLMOptions
from llmrouter_vllm.provider import VLLMProvider

__all__ = ["VLLMBench", "open_bench"]


@asynccontextmanager
async def open_bench(model: str | None) -> AsyncIterator[VLLMBench]:
    """Start an engine for ``model`` (a directory or hub id; None: a tiny random-weight
    Llama built on the fly, which measures the serving path rather than the model)."""
    # vLLM's own log handler writes to standard output, between the table's lines;
    # unconfigured, its records go where the command's logging goes (standard error).
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    with tempfile.TemporaryDirectory(prefix="llmrouter-bench-") as scratch:
        path = model
        if path is None:
            from llmrouter.testing.tiny_models import build_tiny_llama

            path = str(build_tiny_llama(Path(scratch) / "tiny-llama"))
        tiny = model is None
        options = VLLMOptions(
            dtype="float32" if tiny else "auto",
            enforce_eager=tiny,
            kv_cache_space_gib=1 if tiny else None,  # on CPU; plenty for the tiny model
            seed=0,
        )
        provider = VLLMProvider(path, options)
        async with provider:
            yield VLLMBench(provider, model or "tiny random Llama")


class VLLMBench:
    """:class:`~llmrouter.bench.providers.BenchSubject` for a started provider."""

    def __init__(self, provider: VLLMProvider, name: str) -> None:
        self._provider = provider
        self._serial = itertools.count()
        self._prompt = {"prompt_token_ids": provider._render_chat(MESSAGES)}  # the provider's own ids
        self.label = f"{name} (vLLM)"

    async def provider(self, concurrency: int, tokens: int) -> list[Sample]:
        request = chat_request(self._provider.model, tokens, ignore_eos=True)
        return await together(lambda: stream_sample(self._provider.stream(request)), concurrency)

    async def raw(self, concurrency: int, tokens: int) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        engine: Any = self._provider._engine
        prompt = self._prompt

        async def one() -> Sample:
            params = SamplingParams(
                max_tokens=tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
            )
            started = time.perf_counter()
            first: float | None = None
            generated = 0
            async for out in engine.generate(prompt, params, f"bench-raw-{next(self._serial)}"):
                count = sum(len(o.token_ids) for o in out.outputs)
                if first is None and count:
                    first = time.perf_counter()
                generated += count
            return Sample(generated, (first or time.perf_counter()) - started)

        return await together(one, concurrency)
