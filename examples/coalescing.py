"""Identical requests in flight share one upstream call; the next one is a cache hit.

Sends the same deterministic request (``temperature: 0``) from several clients at once:
one of them is answered by the model (``miss``), the others wait for that same call
(``coalesced``) and are billed nothing. A request sent afterwards is a ``hit``.

Start the service first (``make serve``), then::

    .venv/bin/python examples/coalescing.py [--clients 8] [--base-url ...] [--model NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections import Counter

import openai


async def ask(client: openai.AsyncOpenAI, model: str, question: str) -> tuple[str, float, str]:
    started = time.perf_counter()
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=100, temperature=0
    )
    answer = raw.parse().choices[0].message.content or ""
    return raw.headers.get("x-llmrouter-cache", "?"), time.perf_counter() - started, answer


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "unused-until-you-create-keys"))
    args = parser.parse_args()
    # A question of its own, so that an earlier run's cached answer does not answer it.
    question = f"In one sentence, what is a router? (run {uuid.uuid4().hex[:8]})"
    async with openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0) as client:
        results = await asyncio.gather(*(ask(client, args.model, question) for _ in range(args.clients)))
        for status, seconds, _ in results:
            print(f"{status:<10} {seconds * 1000:7.1f} ms")
        counts = Counter(status for status, _, _ in results)
        print("together:", ", ".join(f"{count} {status}" for status, count in sorted(counts.items())))
        print("one answer for all:", len({answer for _, _, answer in results}) == 1)
        status, seconds, _ = await ask(client, args.model, question)
        print(f"once more: {status} in {seconds * 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
