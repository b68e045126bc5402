"""llmrouter against LiteLLM, mode by mode: the bench's rows of both gateways side by side."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llmrouter.bench.gateway import GatewayRow, gateway_target
from llmrouter.bench.litellm import litellm_mode
from llmrouter.bench.stats import median, render_table, round_pairs

__all__ = ["Comparison", "compare_with_litellm", "comparisons_as_dicts", "format_comparisons"]


@dataclass
class Comparison:
    mode: str
    stream: bool
    concurrency: int
    rps: float
    litellm_rps: float
    added_p50_ms: float | None
    litellm_added_p50_ms: float | None
    cpu_ms_per_req: float | None
    litellm_cpu_ms_per_req: float | None
    litellm_cpu_ratio: float | None
    """LiteLLM's CPU per request over llmrouter's: the median of the rounds' ratios (the
    two gateways are measured one after the other in every round), of the rounds both
    answered in."""


def compare_with_litellm(rows: Sequence[GatewayRow]) -> list[Comparison]:
    """A comparison for each mode, stream and concurrency both gateways were measured at."""
    measured = {(row.target, row.stream, row.concurrency): row for row in rows if row.concurrency}
    found: list[Comparison] = []
    for (target, stream, concurrency), theirs in measured.items():
        mode = litellm_mode(target)
        ours = measured.get((gateway_target(mode), stream, concurrency)) if mode else None
        if mode is None or ours is None:
            continue
        pairs = round_pairs(theirs.cpu_ms_rounds, ours.cpu_ms_rounds)
        found.append(
            Comparison(
                mode=mode,
                stream=stream,
                concurrency=concurrency,
                rps=ours.rps,
                litellm_rps=theirs.rps,
                added_p50_ms=ours.added_p50_ms,
                litellm_added_p50_ms=theirs.added_p50_ms,
                cpu_ms_per_req=ours.cpu_ms_per_req,
                litellm_cpu_ms_per_req=theirs.cpu_ms_per_req,
                litellm_cpu_ratio=median([t / o for t, o in pairs]) if pairs else None,
            )
        )
    return found


def format_comparisons(comparisons: Sequence[Comparison]) -> str:
    nan = float("nan")
    headers = [
        "mode",
        "stream",
        "conc",
        "req/s",
        "LiteLLM req/s",
        "added p50",
        "LiteLLM added p50",
        "cpu ms/req",
        "LiteLLM cpu ms/req",
        "LiteLLM cpu x",
    ]
    table = [
        [
            c.mode,
            "yes" if c.stream else "no",
            c.concurrency,
            c.rps,
            c.litellm_rps,
            nan if c.added_p50_ms is None else c.added_p50_ms,
            nan if c.litellm_added_p50_ms is None else c.litellm_added_p50_ms,
            nan if c.cpu_ms_per_req is None else c.cpu_ms_per_req,
            nan if c.litellm_cpu_ms_per_req is None else c.litellm_cpu_ms_per_req,
            "-" if c.litellm_cpu_ratio is None else f"{c.litellm_cpu_ratio:.1f}x",
        ]
        for c in comparisons
    ]
    return render_table(headers, table)


def comparisons_as_dicts(comparisons: Sequence[Comparison]) -> list[dict[str, Any]]:
    return [asdict(c) for c in comparisons]
