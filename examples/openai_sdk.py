"""The official OpenAI SDK against ``llmrouter serve``: a reply, a stream, the router's
headers, and an error.

Start the service first (``make serve``), then::

    .venv/bin/python examples/openai_sdk.py [--base-url http://127.0.0.1:8000/v1] [--model NAME]

With keys created, pass one with ``--api-key`` (or ``OPENAI_API_KEY``).
"""

from __future__ import annotations

import argparse
import os

import openai
from openai.types.chat import ChatCompletionMessageParam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "unused-until-you-create-keys"))
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    question: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the capital of France?"}
    ]

    # A reply, with the headers llmrouter adds: who answered, what it cost, the cache.
    raw = client.chat.completions.with_raw_response.create(
        model=args.model, messages=question, max_tokens=32, temperature=0
    )
    reply = raw.parse()
    print("reply:", reply.choices[0].message.content)
    if reply.usage is not None:
        print(
            f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens"
        )
    for name in ("x-llmrouter-deployment", "x-llmrouter-cost", "x-llmrouter-cache", "x-request-id"):
        print(f"{name}: {raw.headers.get(name, '-')}")  # no deployment on a cache hit

    # A stream; the last chunk carries the usage when asked for.
    print("stream: ", end="")
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage is not None:
            print(f"\nstream usage: {chunk.usage.completion_tokens} completion tokens")

    # Errors are OpenAI-shaped, so the SDK raises its usual exceptions.
    try:
        client.chat.completions.create(model="no-such-model", messages=question)
    except openai.NotFoundError as exc:
        print(f"unknown model: {exc.status_code} {exc.code}")


if __name__ == "__main__":
    main()
