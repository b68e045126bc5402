"""A key with a budget, requests made with it, and what they cost, from the service.

An admin key creates a user key with a daily budget over the admin API, the user key
makes a few requests through the OpenAI SDK, ``GET /v1/usage`` (with the user key)
shows its own rows by model and its budget, and the admin raises that budget in place. (Local models cost nothing unless their
deployment has a ``price``; OpenRouter reports its own.)

Start the service first (``make serve``) and create an admin key in its folder::

    .venv/bin/llmrouter keys create admin --scope admin       # prints the secret once
    LLMROUTER_ADMIN_KEY=sk-llmr-... .venv/bin/python examples/keys_and_usage.py

Once a key exists the service requires one on every request (see docs/accounting.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from datetime import UTC, datetime

import httpx
import openai


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--admin-key", default=os.environ.get("LLMROUTER_ADMIN_KEY"))
    args = parser.parse_args()
    if not args.admin_key:
        print("give an admin key: --admin-key or LLMROUTER_ADMIN_KEY (see the docstring)", file=sys.stderr)
        return 2
    service = httpx.Client(base_url=args.base_url.rstrip("/").removesuffix("/v1"), timeout=30)

    created = service.post(
        "/v1/admin/keys",
        headers={"Authorization": f"Bearer {args.admin_key}"},
        json={"name": f"example-{uuid.uuid4().hex[:6]}", "budget": 1.0, "budget_period": "day", "rpm": 60},
    )
    created.raise_for_status()
    user = created.json()
    print(f"created key {user['name']} ({user['id']}), budget ${user['budget']} a {user['budget_period']}")

    client = openai.OpenAI(base_url=args.base_url, api_key=user["secret"], max_retries=0)
    for question in ("What is 2 + 2?", "Name a planet.", "What is 2 + 2?"):
        raw = client.chat.completions.with_raw_response.create(
            model=args.model, messages=[{"role": "user", "content": question}], max_tokens=100, temperature=0
        )
        print(
            f"{question:<16} cost ${raw.headers.get('x-llmrouter-cost')}  cache {raw.headers.get('x-llmrouter-cache')}"
        )

    usage = service.get("/v1/usage?by=model,status", headers={"Authorization": f"Bearer {user['secret']}"})
    usage.raise_for_status()
    report = usage.json()
    for row in report["data"]:
        print(
            f"{row['model']} {row['status']}: {row['requests']} requests, "
            f"{row['prompt_tokens']} + {row['completion_tokens']} tokens, {row['cache_hits']} cache hits, "
            f"${row['cost']:.6f}"
        )
    for budget in report["budgets"]:
        resets = datetime.fromtimestamp(budget["resets_at"], UTC).strftime("%Y-%m-%d %H:%M UTC")
        print(
            f"{budget['period']} budget: ${budget['spent']:.6f} spent of ${budget['limit']}, resets {resets}"
        )

    # Raise the budget in place: same key, same secret, and the day's spend still counts.
    admin = {"Authorization": f"Bearer {args.admin_key}"}
    service.patch(f"/v1/admin/keys/{user['id']}", headers=admin, json={"budget": 5.0}).raise_for_status()
    after = service.get("/v1/usage", headers={"Authorization": f"Bearer {user['secret']}"}).json()["budgets"]
    print(f"raised the budget: ${after[0]['spent']:.6f} spent of ${after[0]['limit']}")

    service.delete(f"/v1/admin/keys/{user['id']}", headers=admin)
    print(f"revoked {user['id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
