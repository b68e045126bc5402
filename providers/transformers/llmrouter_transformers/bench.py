"""The transformers provider in ``llmrouter bench --providers transformers``.

*raw* is ``model.generate`` on the provider's own model: ``c`` requests at once are one
batch of ``c`` copies of the prompt (greedy, so the rows are the same answer), which is
how a program using transformers alone serves them together. *provider* streams the
same chat through :class:`~llmrouter_transformers.TransformersProvider`, whose engine
batches concurrent requests itself. Both count the tokens they generated and time the
first one (``generate`` through a streamer).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread

from llmrouter.bench.providers import Sample, chat_request, stream_sample, together
from llmrouter_transformers.prompts import chat_prompt_ids, load_template
from llmrouter_transformers.provider import TransformersOptions, TransformersProvider
from llmrouter_transformers.smollm2 import MODEL_NAME as SMOLLM2_MODEL_NAME

__all__ = ["TransformersBench", "open_bench"]

TINY = "tiny"
"""``--provider-model tiny``: a tiny random-weight Llama built on the fly (seconds; for
trying the benchmark, not for figures)."""


@asynccontextmanager
async def open_bench(model: str | None) -> AsyncIterator[TransformersBench]:
    """Load ``model`` (a directory or hub id; None: the embedded SmolLM2; ``tiny``)."""
    with tempfile.TemporaryDirectory(prefix="llmrouter-bench-") as scratch:
        path = model
        if model == TINY:
            from llmrouter.testing.tiny_models import build_tiny_llama

            path = str(build_tiny_llama(Path(scratch) / "tiny-llama", max_position_embeddings=4096))
        provider = TransformersProvider(path or SMOLLM2_MODEL_NAME, TransformersOptions(path=path))
        async with provider:
            yield TransformersBench(provider, "tiny random Llama" if model == TINY else provider.model)


class _FirstToken:
    """A ``generate`` streamer that notes when the first generated tokens arrive (the
    first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.at: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class TransformersBench:
    """:class:`~llmrouter.bench.providers.BenchSubject` for a started provider."""

    def __init__(self, provider: TransformersProvider, name: str) -> None:
        self._provider = provider
        engine = provider.engine
        self.label = f"{name} ({engine.device}, {str(engine.model.dtype).removeprefix('torch.')})"
        # The provider's own prompt ids for the chat, for generate.
        self._prompt = chat_prompt_ids(
            engine.tokenizer,
            chat_request(provider.model, 1),
            template=load_template(provider.options.chat_template),
            model=provider.model,
        )

    async def provider(self, concurrency: int, tokens: int) -> list[Sample]:
        request = chat_request(self._provider.model, tokens)
        return await together(lambda: stream_sample(self._provider.stream(request)), concurrency)

    async def raw(self, concurrency: int, tokens: int) -> list[Sample]:
        rows, ttft = await anyio.to_thread.run_sync(self.generate, concurrency, tokens)
        return [Sample(len(row), ttft) for row in rows]

    def generate(self, concurrency: int, tokens: int) -> tuple[list[list[int]], float]:
        """``model.generate`` on ``concurrency`` copies of the provider's prompt ids: each
        row's new token ids (up to and including an end token, as the engine counts
        them), and the seconds until the first ones."""
        import torch

        engine = self._provider.engine
        prompt = self._prompt
        ids = torch.tensor([prompt] * concurrency, device=engine.device)
        streamer = _FirstToken()
        started = time.perf_counter()
        with torch.inference_mode():
            out = engine.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=engine.pad_token_id,
                streamer=streamer,
            )
        ends = set(engine.eos_token_ids)
        rows = [_until_end(row.tolist(), ends) for row in out[:, len(prompt) :]]
        return rows, (streamer.at or time.perf_counter()) - started


def _until_end(tokens: list[int], ends: set[int]) -> list[int]:
    """``tokens`` up to and including the first end-of-sequence one (the padding after it
    is not generated)."""
    for index, token in enumerate(tokens):
        if token in ends:
            return tokens[: index + 1]
    return tokens
