"""Identical requests at once: how many upstream calls each gateway makes for them.

A burst of identical requests (temperature 0) is sent at the same moment to each
target, in front of a fake upstream that takes ``delay_ms`` to start answering and
records what reaches it. llmrouter's cache coalesces the burst into one upstream call
(its flight; the others get its answer, or its chunks as they arrive); a cache that
only stores finished answers sends every request of the burst upstream, as no cache
does. Measured for JSON requests and streams; each target first answers one other
request, so that its start-up work is not in the burst's latencies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from llmrouter.bench.gateway import body_factory, running_targets
from llmrouter.bench.loadgen import http_request, send_at_once
from llmrouter.bench.stats import median, render_table

__all__ = ["DELAY_MS", "BurstRow", "burst_rows_as_dicts", "format_burst_rows", "run_coalescing_bench"]

DELAY_MS = 200.0
"""How long the upstream takes to start answering: long enough for a burst to overlap."""


@dataclass
class BurstRow:
    target: str
    stream: bool
    requests: int
    upstream_calls: int
    p50_ms: float
    max_ms: float
    errors: int


def run_coalescing_bench(
    *,
    requests: int,
    delay_ms: float = DELAY_MS,
    chunks: int = 20,
    litellm_command: str | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> list[BurstRow]:
    """A burst of ``requests`` identical requests at the upstream directly, at llmrouter
    with its cache, and (given ``litellm_command``) at LiteLLM with its cache."""
    with running_targets(
        ["cache"], litellm_command, chunks, record=True, first_byte_delay_ms=delay_ms
    ) as targets:
        rows = []
        for stream in (False, True):
            for target, child in targets.children.items():
                progress(f"{requests} identical requests at {target} stream={stream}")
                headers = targets.headers.get(target)
                rows.append(_burst(target, child.port, headers, stream, requests, targets.upstream_port))
        return rows


def _burst(
    target: str, port: int, headers: dict[str, str] | None, stream: bool, requests: int, upstream_port: int
) -> BurstRow:
    body = body_factory(stream)  # a new factory: no cache has its bodies yet

    def payload(number: int) -> bytes:
        return http_request("127.0.0.1", port, "/v1/chat/completions", body(number), headers)

    asyncio.run(send_at_once("127.0.0.1", port, payload(0), 1))
    with httpx.Client(base_url=f"http://127.0.0.1:{upstream_port}") as control:
        control.post("/_fake/reset").raise_for_status()
        answers = asyncio.run(send_at_once("127.0.0.1", port, payload(1), requests))  # all alike
        recorded = control.get("/_fake/requests").raise_for_status().json()
    calls = sum(1 for request in recorded if request["path"].endswith("/chat/completions"))
    seconds = [elapsed for _, elapsed in answers]
    return BurstRow(
        target=target,
        stream=stream,
        requests=requests,
        upstream_calls=calls,
        p50_ms=median(seconds) * 1000,
        max_ms=max(seconds) * 1000,
        errors=sum(1 for status, _ in answers if status != 200),
    )


def format_burst_rows(rows: Sequence[BurstRow]) -> str:
    headers = ["target", "stream", "identical requests", "upstream calls", "p50 ms", "max ms", "errors"]
    table = [
        [r.target, "yes" if r.stream else "no", r.requests, r.upstream_calls, r.p50_ms, r.max_ms, r.errors]
        for r in rows
    ]
    return render_table(headers, table)


def burst_rows_as_dicts(rows: Sequence[BurstRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
