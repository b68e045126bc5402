"""A client that stops reading stops the generation.

Streams a long answer, closes the stream after a few chunks, then watches ``/ready``:
the deployment's requests in flight drop to zero at once (for a local model, its engine
reports nothing left decoding), instead of generating the remaining tokens for nobody.

Start the service first (``make serve``), then::

    .venv/bin/python examples/cancel_stream.py [--chunks 5] [--base-url ...] [--model NAME]
"""

from __future__ import annotations

import argparse
import os
import re
import time

import httpx
import openai


def in_flight(ready_url: str, model: str) -> list[dict[str, object]]:
    deployments = httpx.get(ready_url, timeout=10).json()["deployments"]
    return [d for d in deployments if d["group"] == model]


def idle(deployment: dict[str, object]) -> bool:
    """Nothing in flight, and for a local model (its detail reads "1 decoding, 0 queued")
    nothing left in its engine either."""
    return deployment["in_flight"] == 0 and not re.search(
        r"\b[1-9]\d* decoding", str(deployment.get("detail"))
    )


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
        for deployment in in_flight(ready_url, args.model):
            print(f"\nwhile streaming: {deployment['id']} in flight {deployment['in_flight']}")
    left = time.perf_counter()  # leaving the `with` closed the connection
    while True:
        deployments = in_flight(ready_url, args.model)
        if all(idle(d) for d in deployments) or time.perf_counter() - left > 10:
            break
        time.sleep(0.01)
    for deployment in deployments:
        detail = f" ({deployment['detail']})" if deployment.get("detail") else ""
        print(f"after leaving: {deployment['id']} in flight {deployment['in_flight']}{detail}")
    print(f"released {(time.perf_counter() - left) * 1000:.0f} ms after the client left")


if __name__ == "__main__":
    main()
