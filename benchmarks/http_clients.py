"""HTTP clients for the upstream call, measured the same way: CPU per request.

Usage::

    .venv/bin/python benchmarks/http_clients.py [--requests 6400] [--concurrency 64] [--rounds 3]

The fake OpenAI-compatible upstream (``llmrouter.testing.upstream``) runs on the first
core, this process on the second. Each client sends the same non-streaming chat request
``--requests`` times from ``--concurrency`` tasks on uvloop; the table shows this
process's CPU time per request (median of ``--rounds``) and the request rate:

- ``OpenAICompatClient`` on each of its pools (what the gateway does per request, with
  request encoding and response decoding): the default :mod:`llmrouter.http1` pool, and
  httpx's own pool (``LLMROUTER_HTTP_TRANSPORT=httpx``);
- the clients bare (only send and read the body): ``HTTP1Pool``, ``aiohttp``
  (``pip install aiohttp``; skipped when missing), ``httpx.AsyncClient``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import time
from collections.abc import Awaitable, Callable

import msgspec

from llmrouter.bench.processes import Child, free_port, pin_self, python_argv
from llmrouter.bench.stats import render_table
from llmrouter.http1 import HTTP1Pool
from llmrouter.openai_compat import TRANSPORT_ENV, OpenAICompatClient
from llmrouter.types import ChatRequest

BODY = b'{"model":"mock-gpt","messages":[{"role":"user","content":"Say hello."}],"max_tokens":64}'
HEADERS = {"content-type": "application/json", "accept": "application/json"}

Factory = Callable[[str], Awaitable[tuple[Callable[[], Awaitable[object]], Callable[[], Awaitable[None]]]]]


async def compat(
    base_url: str, transport: str
) -> tuple[Callable[[], Awaitable[object]], Callable[[], Awaitable[None]]]:
    os.environ[TRANSPORT_ENV] = transport
    client = OpenAICompatClient(base_url, provider="remote")
    request = msgspec.json.decode(BODY, type=ChatRequest)
    return (lambda: client.chat(request)), client.aclose


async def http1(base_url: str) -> tuple[Callable[[], Awaitable[object]], Callable[[], Awaitable[None]]]:
    pool = HTTP1Pool(base_url)

    async def call() -> bytes:
        response = await pool.request("POST", "/chat/completions", HEADERS, BODY)
        try:
            return await response.aread()
        finally:
            await response.aclose()

    return call, pool.aclose


async def aiohttp_session(
    base_url: str,
) -> tuple[Callable[[], Awaitable[object]], Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), auto_decompress=False)
    url = f"{base_url}/chat/completions"

    async def call() -> bytes:
        async with session.post(url, data=BODY, headers=HEADERS) as response:
            return await response.read()

    return call, session.close


async def httpx_client(
    base_url: str,
) -> tuple[Callable[[], Awaitable[object]], Callable[[], Awaitable[None]]]:
    import httpx

    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=256), trust_env=False)
    url = f"{base_url}/chat/completions"

    async def call() -> bytes:
        return (await client.post(url, content=BODY, headers=HEADERS)).content

    return call, client.aclose


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _run(factory: Factory, base_url: str, requests: int, concurrency: int) -> tuple[float, float]:
    call, close = await factory(base_url)

    async def worker(count: int) -> None:
        for _ in range(count):
            await call()

    await asyncio.gather(*(worker(8) for _ in range(concurrency)))  # warm-up: open the pool
    cpu, started = _cpu(), time.perf_counter()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    elapsed, used = time.perf_counter() - started, _cpu() - cpu
    await close()
    done = requests // concurrency * concurrency
    return used / done * 1e6, done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6400)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import uvloop

    clients: list[tuple[str, Factory]] = [
        ("OpenAICompatClient on http1", lambda url: compat(url, "http1")),
        ("OpenAICompatClient on httpx", lambda url: compat(url, "httpx")),
        ("HTTP1Pool", http1),
        ("httpx.AsyncClient", httpx_client),
    ]
    try:
        import aiohttp  # noqa: F401

        clients.insert(3, ("aiohttp.ClientSession", aiohttp_session))
    except ImportError:
        print("aiohttp is not installed: skipped")

    pin_self(1)
    port = free_port()
    upstream = Child(
        python_argv(
            "-m", "llmrouter.testing.upstream", "--port", str(port), "--no-record", "--model", "mock-gpt"
        ),
        port,
    )
    rows = []
    try:
        upstream.wait_listening()
        base_url = f"http://127.0.0.1:{port}/v1"
        for name, factory in clients:
            results = [
                uvloop.run(_run(factory, base_url, args.requests, args.concurrency))
                for _ in range(args.rounds)
            ]
            rows.append(
                [name, statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)]
            )
            print(f"{name}: {rows[-1][1]:.1f} µs CPU per request", flush=True)
    finally:
        upstream.stop()
    print()
    print(render_table(["client", "cpu µs/req", "req/s"], rows))


if __name__ == "__main__":
    main()
