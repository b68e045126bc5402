"""llmrouter as a library: a Router in your own process, with failover, hooks and
cancellation; no server.

The group ``assistant`` prefers a remote OpenAI-compatible server (``--primary``; by
default an address where nothing listens) and falls over to the embedded SmolLM2 model,
run in this process by the transformers provider. A hook prints every attempt; the
request context tells who answered and what it cost; leaving a stream early stops the
model's generation.

Run it from the checkout, where ``make serve`` or ``make test`` installed the providers::

    .venv/bin/python examples/router_library.py [--primary http://127.0.0.1:8000/v1]
"""

from __future__ import annotations

import argparse
import asyncio
from contextlib import aclosing

from llmrouter import LLMRouterError, RequestContext, Router, RouterHooks, parse_config


class PrintAttempts(RouterHooks):
    """Hooks see each request's admission, attempts, fallbacks and end (docs/routing.md)."""

    def on_attempt(self, ctx: RequestContext, deployment: str, error: LLMRouterError | None) -> None:
        print(f"  attempt on {deployment}: {'ok' if error is None else f'failed ({error.message})'}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--primary", default="http://127.0.0.1:9/v1", help="an OpenAI-compatible base URL")
    parser.add_argument("--primary-model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    config = parse_config(
        {
            "models": [
                {
                    "name": "assistant",
                    "deployments": [
                        {"provider": "remote", "model": args.primary_model, "base_url": args.primary},
                        {"provider": "transformers", "model": "smollm2-135m-instruct", "priority": 1},
                    ],
                }
            ],
        }
    )
    async with Router(config, hooks=[PrintAttempts()]) as router:
        print("a reply:")
        ctx = RequestContext()
        reply = await router.chat(
            {
                "model": "assistant",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
            },
            context=ctx,
        )
        print(f"  {reply.choices[0].message.content!r}")
        tokens = ctx.usage.total_tokens if ctx.usage is not None else "?"
        print(f"  answered by {ctx.deployment} after {ctx.attempts} attempt(s), {tokens} tokens")

        print("a stream, left after five chunks:")
        request = {
            "model": "assistant",
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 500,
        }
        pieces: list[str] = []
        ctx = RequestContext()
        async with aclosing(
            router.stream(request, context=ctx)
        ) as stream:  # closing it cancels the generation
            async for chunk in stream:
                pieces.extend(choice.delta.content or "" for choice in chunk.choices)
                if len(pieces) == 5:
                    break
        print(f"  {''.join(pieces)!r} ... from {ctx.deployment}")
        for deployment in (await router.readiness(probe=False))["deployments"]:
            print(f"  after leaving: {deployment['id']} in flight {deployment['in_flight']}")


if __name__ == "__main__":
    asyncio.run(main())
