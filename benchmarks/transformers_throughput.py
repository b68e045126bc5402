"""Throughput of the transformers provider: overhead vs raw ``model.generate``, and batching gain.

Usage::

    .venv/bin/python benchmarks/transformers_throughput.py                 # SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/transformers_throughput.py --model DIR_OR_HUB_ID --tokens 128
    .venv/bin/python benchmarks/transformers_throughput.py --tiny          # a tiny random Llama (seconds)

Prints two tables:

1. concurrency 1, greedy: tokens/s of ``TransformersProvider.chat`` against
   ``model.generate`` on the same prompt and the same number of new tokens
   (target: at most 5 % overhead);
2. aggregate tokens/s with 1, 4 and 8 concurrent requests through the provider
   (target: at least 3x at 8 compared with 1).

Each figure is the median of ``--repeats`` runs. On a shared or small CPU the numbers
are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from llmrouter.types import decode_chat_request

PROMPTS = [
    "Write a long story about a fox and a dog.",
    "Explain how a bicycle works, step by step.",
    "Describe the city of Paris for a tourist.",
    "List ten facts about the ocean.",
    "Write a poem about the moon and the sea.",
    "Explain photosynthesis to a child.",
    "What should I pack for a week of hiking?",
    "Tell me about the history of the printing press.",
]


def chat_request(model: str, prompt: str, tokens: int) -> Any:
    return decode_chat_request(
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "temperature": 0,
        }
    )


async def provider_once(provider: Any, prompt: str, tokens: int) -> tuple[int, float]:
    started = time.perf_counter()
    response = await provider.chat(chat_request(provider.model, prompt, tokens))
    return response.usage.completion_tokens, time.perf_counter() - started


def generate_once(provider: Any, prompt: str, new_tokens: int) -> tuple[int, float]:
    """Raw ``model.generate`` on the provider's own model and chat-formatted prompt."""
    import torch

    engine = provider.engine
    text = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = engine.tokenizer(text, add_special_tokens=False, return_tensors="pt").to(engine.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(
            **ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    elapsed = time.perf_counter() - started
    return out.shape[1] - ids["input_ids"].shape[1], elapsed


async def aggregate(provider: Any, concurrency: int, tokens: int) -> float:
    results: list[tuple[int, float]] = []

    async def one(index: int) -> None:
        results.append(await provider_once(provider, PROMPTS[index % len(PROMPTS)], tokens))

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for index in range(concurrency):
            tg.start_soon(one, index)
    wall = time.perf_counter() - started
    return sum(n for n, _ in results) / wall


async def run(args: argparse.Namespace) -> None:
    from llmrouter_transformers import SMOLLM2_MODEL_NAME, TransformersOptions, TransformersProvider

    path = args.model
    if args.tiny:
        from llmrouter.testing.tiny_models import build_tiny_llama

        path = str(build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny-llama", max_position_embeddings=4096))
    name = path or SMOLLM2_MODEL_NAME
    options = TransformersOptions(
        path=path, device=args.device, dtype=args.dtype, max_batch_size=max(8, args.max_batch)
    )
    async with TransformersProvider(name, options) as provider:
        engine = provider.engine
        import torch

        if args.threads:  # the same for generate (main thread) as for the engine's thread
            torch.set_num_threads(args.threads)

        print(
            f"\nmodel: {name}  device: {engine.device}  dtype: {engine.model.dtype}  torch threads: {args.threads or torch.get_num_threads()}"
        )
        prompt = PROMPTS[0]
        await provider_once(provider, prompt, 8)  # warm-up (allocations, first-call paths)
        generate_once(provider, prompt, 8)

        provider_rates, generate_rates = [], []
        for _ in range(args.repeats):
            n, elapsed = await provider_once(provider, prompt, args.tokens)
            provider_rates.append(n / elapsed)
            # Same prompt, same number of new tokens (greedy: the same tokens too).
            m, elapsed = generate_once(provider, prompt, n)
            generate_rates.append(m / elapsed)
        ours, raw = statistics.median(provider_rates), statistics.median(generate_rates)
        print("\n| concurrency 1, greedy | tokens/s |")
        print("|---|---|")
        print(f"| model.generate | {raw:.1f} |")
        print(f"| TransformersProvider.chat | {ours:.1f} |")
        print(f"| overhead | {100 * (raw - ours) / raw:+.1f} % (target <= 5 %) |")

        rates = {}
        for concurrency in (1, 4, 8):
            rates[concurrency] = statistics.median(
                [await aggregate(provider, concurrency, args.tokens) for _ in range(args.repeats)]
            )
        print(f"\n| concurrent requests ({args.tokens} tokens each) | aggregate tokens/s | vs 1 |")
        print("|---|---|---|")
        for concurrency, rate in rates.items():
            print(f"| {concurrency} | {rate:.1f} | {rate / rates[1]:.2f}x |")
        print(f"\nengine peak batch: {engine.peak_batch} rows (target at 8: >= 3x)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model directory or hub id (default: the embedded SmolLM2)")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random Llama built on the fly")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (1 is steadier on a shared CPU)"
    )
    anyio.run(run, parser.parse_args())


if __name__ == "__main__":
    main()
