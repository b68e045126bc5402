"""A client that stops reading stops the generation.

Streams a long answer, closes the stream after a few chunks, then watches ``/ready``:
the deployment's requests in flight drop to zero within milliseconds, and a local
model's engine reports nothing left decoding, instead of generating the remaining
tokens for nobody.

Start the service first (``make serve``), then::

    .venv/bin/python examples/cancel_stream.py [--chunks 5] [--base-url ...] [--model NAME]
"""

from __future__ import annotations

import argparse
import os
import time

import httpx
import openai


def deployments(ready_url: str, model: str) -> list[dict[str, object]]:
    return [d for d in httpx.get(ready_url, timeout=10).json()["deployments"] if d["group"] == model]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=5, help="chunks to read before leaving")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "unused-until-you-create-keys"))
    args = parser.parse_args()
    ready_url = args.base_url.rstrip("/").removesuffix("/v1") + "/ready"
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)

    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        max_tokens=1000,
        stream=True,
    )
    with stream:
        for read, chunk in enumerate(stream, start=1):
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
            if read == args.chunks:
                break
        for deployment in deployments(ready_url, args.model):
            print(f"\nwhile streaming: {deployment['id']} in flight {deployment['in_flight']}")
    left = time.perf_counter()  # leaving the `with` closed the connection
    while any(d["in_flight"] for d in deployments(ready_url, args.model)) and time.perf_counter() - left < 10:
        time.sleep(0.01)
    print(f"released {(time.perf_counter() - left) * 1000:.0f} ms after the client left")
    # /ready refreshes its probe of each deployment at most once a second: wait for a fresh
    # one to see what the provider reports (a local model: "0 decoding, 0 queued").
    time.sleep(1.1)
    for deployment in deployments(ready_url, args.model):
        detail = f" ({deployment['detail']})" if deployment.get("detail") else ""
        print(f"after leaving: {deployment['id']} in flight {deployment['in_flight']}{detail}")


if __name__ == "__main__":
    main()
