"""Throughput of the vllm provider against raw vLLM ``AsyncLLM`` on the same engine.

Builds a tiny random-weight Llama offline, starts one engine through
:class:`llmrouter_vllm.VLLMProvider`, then streams the same chat (same prompt token
ids, greedy, ``ignore_eos``) at several concurrencies two ways: through
``provider.stream`` (chat template, wire chunks, usage, abort bookkeeping) and straight
through ``engine.generate``. Prints generated tokens per second for both and the
provider's overhead. Run it in the vLLM environment (``scripts/setup-vllm-env``)::

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_throughput.py

On a CPU the numbers are noisy (other processes share the cores): compare rows of
one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated concurrencies")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency and path")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per row (best kept)")
    parser.add_argument("--model", help="model directory (default: build a tiny Llama)")
    parser.add_argument("--multiprocessing", choices=("on", "off"), help="VLLM_ENABLE_V1_MULTIPROCESSING")
    return parser.parse_args()


async def run_provider(
    provider: Any, body: dict[str, Any], count: int, concurrency: int
) -> tuple[int, float]:
    from llmrouter.types import decode_chat_request

    tokens = 0

    async def worker(share: int) -> None:
        nonlocal tokens
        for _ in range(share):
            async for chunk in provider.stream(decode_chat_request(body)):
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens

    elapsed = await timed_workers(worker, count, concurrency)
    return tokens, elapsed


async def run_raw(
    engine: Any, prompt_ids: list[int], max_tokens: int, count: int, concurrency: int
) -> tuple[int, float]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    tokens = 0
    serial = iter(range(1_000_000))

    async def worker(share: int) -> None:
        nonlocal tokens
        for _ in range(share):
            params = SamplingParams(
                max_tokens=max_tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
            )
            async for out in engine.generate({"prompt_token_ids": prompt_ids}, params, f"raw-{next(serial)}"):
                tokens += sum(len(o.token_ids) for o in out.outputs)

    elapsed = await timed_workers(worker, count, concurrency)
    return tokens, elapsed


async def timed_workers(worker: Any, count: int, concurrency: int) -> float:
    shares = [count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)]
    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for share in shares:
            group.start_soon(worker, share)
    return time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    from llmrouter_vllm import VLLMOptions, VLLMProvider

    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as scratch:
        model = args.model
        if model is None:
            from llmrouter.testing.tiny_models import build_tiny_llama

            model = str(build_tiny_llama(Path(scratch) / "tiny-llama"))
        multiprocessing = None if args.multiprocessing is None else args.multiprocessing == "on"
        options = VLLMOptions(
            dtype="float32",
            max_model_len=512,
            enforce_eager=True,
            kv_cache_space_gib=1,
            multiprocessing=multiprocessing,
        )
        started = time.perf_counter()
        async with VLLMProvider(model, options) as provider:
            start_s = time.perf_counter() - started
            body = {
                "model": model,
                "messages": [{"role": "user", "content": "Tell me a story about a fox."}],
                "temperature": 0,
                "max_tokens": args.max_tokens,
                "ignore_eos": True,
                "stream": True,
            }
            prompt_ids = provider._render_chat(body["messages"])  # the same ids the provider sends
            await run_raw(provider._engine, prompt_ids, args.max_tokens, 2, 1)  # warm-up
            print(
                f"engine start (import + build): {start_s:.1f} s; prompt {len(prompt_ids)} tokens; "
                f"{args.max_tokens} tokens x {args.requests} requests, best of {args.rounds} rounds per row; "
                f"VLLM_ENABLE_V1_MULTIPROCESSING={os.environ.get('VLLM_ENABLE_V1_MULTIPROCESSING', '1 (default)')}"
            )
            print(
                f"{'concurrency':>11} | {'raw AsyncLLM tok/s':>18} | {'provider tok/s':>14} | {'overhead':>8}"
            )
            print(f"{'-' * 11}-+-{'-' * 18}-+-{'-' * 14}-+-{'-' * 8}")
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                raw_rate = prov_rate = 0.0
                # Alternate the two paths and keep each one's best round: on a shared CPU
                # the order of runs matters more than the path otherwise.
                for _ in range(args.rounds):
                    raw_tokens, raw_s = await run_raw(
                        provider._engine, prompt_ids, args.max_tokens, args.requests, concurrency
                    )
                    prov_tokens, prov_s = await run_provider(provider, body, args.requests, concurrency)
                    assert raw_tokens == prov_tokens == args.requests * args.max_tokens, (
                        raw_tokens,
                        prov_tokens,
                    )
                    raw_rate, prov_rate = (
                        max(raw_rate, raw_tokens / raw_s),
                        max(prov_rate, prov_tokens / prov_s),
                    )
                overhead = (raw_rate - prov_rate) / raw_rate * 100
                print(f"{concurrency:>11} | {raw_rate:>18.0f} | {prov_rate:>14.0f} | {overhead:>7.1f}%")


if __name__ == "__main__":  # vLLM's CPU platform spawns workers: keep engine creation guarded
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    anyio.run(main, parse_args())
