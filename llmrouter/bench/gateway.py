"""Gateway overhead: the same load straight at a fast fake upstream and through
``llmrouter serve``, non-streaming and streaming, at several concurrencies.

Layout on the machine: the upstream and the gateway share the first core, the load
generator (this process) runs on the second, so that the gateway's CPU per request is
what the table shows and the load generator does not steal it. Every figure is the
median of ``rounds`` measured windows after a warm-up.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import yaml

from llmrouter.bench import litellm
from llmrouter.bench.loadgen import LoadResult, http_request, run_load
from llmrouter.bench.processes import Child, free_port, pinned, python_argv
from llmrouter.bench.stats import median, percentile, render_table, round_pairs

__all__ = [
    "GatewayRow",
    "Targets",
    "body_factory",
    "gateway_target",
    "run_gateway_bench",
    "running_targets",
    "start_upstream",
]

MODEL = "mock-gpt"


def gateway_target(mode: str) -> str:
    """The table's name for the gateway in ``mode``."""
    return f"gateway[{mode}]"


BARE_TARGET = gateway_target("bare")

# Subsystems switched off: what the bare routing path costs.
BARE = {
    "accounting": {"enabled": False},
    "cache": {"backend": "none"},
    "telemetry": {"metrics": False, "json_logs": False, "access_log": False},
}


MODES = ("bare", "full", "accounting", "cache", "metrics")
"""The gateway configurations ``llmrouter bench --modes`` takes."""


def _mode_config(mode: str, workdir: Path) -> dict[str, Any]:
    """Subsystem settings for a mode: ``bare``, ``full`` (all on), or one of
    ``accounting``, ``cache``, ``metrics`` on alone, so each one's cost shows."""
    accounting = {
        "enabled": True,
        "database": {"url": f"sqlite+aiosqlite:///{workdir / f'{mode}.db'}"},
        "ledger": {"journal_dir": str(workdir / f"{mode}-journal")},
    }
    cache = {"backend": "memory"}  # every request a miss and a store (unique prompts)
    telemetry = {"metrics": True, "json_logs": True, "access_log": False, "log_level": "WARNING"}
    on = {"full": {"accounting", "cache", "metrics"}, "bare": set()}.get(mode, {mode})
    if mode not in MODES:
        raise ValueError(f"unknown bench mode {mode!r} ({', '.join(MODES)})")
    return {
        "accounting": accounting if "accounting" in on else BARE["accounting"],
        "cache": cache if "cache" in on else BARE["cache"],
        "telemetry": telemetry if "metrics" in on else BARE["telemetry"],
    }


@dataclass
class GatewayRow:
    target: str
    stream: bool
    concurrency: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    ttfb_p50_ms: float
    """Time to the first generated text (a stream's first chunk with content, not its
    role-only first chunk; a JSON answer's body): :class:`~llmrouter.bench.loadgen.LoadResult`."""
    added_p50_ms: float | None
    cpu_ms_per_req: float | None
    rss_mb: float | None
    errors: int
    cpu_vs_bare: float | None = None
    """CPU per request over bare's (the same gateway's: llmrouter's, or LiteLLM's) at the
    same stream and concurrency, minus 1 (0.2: 20% more): what the subsystems a mode
    turns on cost. The median of the rounds' ratios, each against bare in the same
    round, so that a machine slowing down between rounds does not show as a cost. None
    for direct and bare."""
    cpu_ms_over_bare: float | None = None
    """The same cost in time: CPU ms per request over bare's, the median of the rounds'
    differences, each against bare in the same round. The issue's budget for it is 20%
    of the gateway's: 0.1 ms of a JSON request's 0.5 ms, 0.3 ms of a stream's 1.5 ms.
    None for direct and bare."""
    cpu_ms_rounds: list[float | None] = field(default_factory=list)
    """CPU ms per request in each round, in order (the gateways only): one entry a round,
    None for a round the target answered nothing in (it had died), so that the rounds
    of two targets still pair up round by round."""


def _config(upstream_port: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "discover": False,
        "models": [
            {
                "name": MODEL,
                "deployments": [
                    {"provider": "remote", "model": MODEL, "base_url": f"http://127.0.0.1:{upstream_port}/v1"}
                ],
            }
        ],
        **extra,
    }


def body_factory(stream: bool) -> Callable[[int], bytes]:
    """Request bodies by number: a different message for each number (and each factory,
    so that no cache has one yet); the same number, the same body."""
    tail = ',"stream":true' if stream else ""
    run = uuid.uuid4().hex[:12]

    def body(i: int) -> bytes:
        # With the cache on, a new number is a miss and a store, never a hit.
        return (
            f'{{"model":"{MODEL}","temperature":0,"max_tokens":64,'
            f'"messages":[{{"role":"user","content":"Say hello, request {run}-{i}."}}]{tail}}}'
        ).encode()

    return body


def _round(
    port: int,
    stream: bool,
    concurrency: int,
    duration: float,
    child: Child | None,
    headers: dict[str, str] | None = None,
) -> tuple[LoadResult, float | None]:
    """One measured window: the load's result, and the server's CPU ms per request."""
    make_body = body_factory(stream)

    def make_request(i: int) -> bytes:
        return http_request("127.0.0.1", port, "/v1/chat/completions", make_body(i), headers)

    before = child.cpu_seconds() if child else 0.0
    result = asyncio.run(
        run_load(
            "127.0.0.1",
            port,
            make_request,
            concurrency=concurrency,
            duration=duration,
            warmup=min(0.5, duration / 4),
        )
    )
    cpu = (child.cpu_seconds() - before) * 1000 / result.total if child and result.total else None
    return result, cpu


def _row(
    target: str,
    stream: bool,
    concurrency: int,
    results: list[LoadResult],
    cpus: list[float | None],
    rss: float | None,
    direct_p50: float | None,
) -> GatewayRow:
    p50 = _p50_ms(results)
    measured = [cpu for cpu in cpus if cpu is not None]
    return GatewayRow(
        target=target,
        stream=stream,
        concurrency=concurrency,
        rps=median([r.completed / r.elapsed for r in results]),
        p50_ms=p50,
        p90_ms=median([percentile(r.latencies, 90) for r in results]) * 1000,
        p99_ms=median([percentile(r.latencies, 99) for r in results]) * 1000,
        ttfb_p50_ms=median([percentile(r.first_content, 50) for r in results]) * 1000,
        added_p50_ms=None if direct_p50 is None else p50 - direct_p50,
        cpu_ms_per_req=median(measured) if measured else None,
        rss_mb=rss,
        errors=sum(r.errors for r in results),
        cpu_ms_rounds=cpus,
    )


def _idle_row(target: str, rss: float) -> GatewayRow:
    nan = float("nan")
    return GatewayRow(
        target=target,
        stream=False,
        concurrency=0,
        rps=nan,
        p50_ms=nan,
        p90_ms=nan,
        p99_ms=nan,
        ttfb_p50_ms=nan,
        added_p50_ms=None,
        cpu_ms_per_req=None,
        rss_mb=rss,
        errors=0,
    )


def start_upstream(
    port: int,
    chunks: int,
    *,
    log: Path | None = None,
    record: bool = False,
    first_byte_delay_ms: float = 0.0,
    chunk_delay_ms: float = 0.0,
) -> Child:
    """The fake OpenAI-compatible upstream on ``port`` (``chunks`` per stream, model
    :data:`MODEL`; nothing recorded unless ``record``), once it listens. It waits
    ``first_byte_delay_ms`` before its headers and ``chunk_delay_ms`` before each chunk
    after the first (before a JSON answer: that per chunk it would have streamed)."""
    argv = python_argv("-m", "llmrouter.testing.upstream", "--port", str(port), "--chunks", str(chunks))
    argv += ["--model", MODEL, "--first-byte-delay-ms", str(first_byte_delay_ms)]
    argv += ["--delay-ms", str(chunk_delay_ms)]
    if not record:
        argv.append("--no-record")
    child = Child(argv, port, log=log)
    try:
        child.wait_listening()
    except BaseException:
        child.stop()
        raise
    return child


def gateway_argv(config_path: Path, port: int, access_log: bool) -> list[str]:
    """``llmrouter serve`` as the bench runs it: one process (``--workers 1``, whatever
    the config or environment says), whose CPU and RSS are the server's own and not a
    supervisor's."""
    argv = python_argv("-m", "llmrouter.cli", "serve", "--config", str(config_path), "--port", str(port))
    argv += ["--workers", "1"]
    if not access_log:
        argv.append("--no-access-log")
    return argv


def _start_gateway(config: dict[str, Any], workdir: Path, name: str) -> Child:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = gateway_argv(path, port, config["telemetry"]["access_log"])
    child = Child(argv, port, log=workdir / f"{name}.log")
    try:
        child.wait_listening()
    except BaseException:
        child.stop()
        raise
    return child


def run_gateway_bench(
    *,
    concurrencies: Sequence[int] = (1, 16, 64),
    duration: float = 3.0,
    rounds: int = 3,
    chunks: int = 20,
    modes: Sequence[str] = ("bare", "full"),
    litellm_command: str | None = None,
    first_byte_delay_ms: float = 0.0,
    chunk_delay_ms: float = 0.0,
    progress: Callable[[str], None] = lambda _: None,
) -> list[GatewayRow]:
    """Measure direct vs gateway (bare and with accounting + cache + metrics), and, given
    ``litellm_command`` (LiteLLM's ``litellm``), LiteLLM's proxy in the modes it has a
    counterpart of (:data:`llmrouter.bench.litellm.MODES`), in front of an upstream with
    the given delays (:func:`start_upstream`).

    Every target is measured once per round, in turn, before the next round begins:
    a machine that slows down for a while slows every target alike, so the ratios
    between them hold even when the absolute figures drift.
    """
    started = running_targets(
        modes, litellm_command, chunks, first_byte_delay_ms=first_byte_delay_ms, chunk_delay_ms=chunk_delay_ms
    )
    with pinned(1), started as targets:
        idle_rss = {target: child.rss_mb() for target, child in targets.children.items()}
        return _measure_all(
            targets.children, targets.headers, concurrencies, duration, rounds, idle_rss, progress
        )


class Targets(NamedTuple):
    children: dict[str, Child]
    """By target name: ``direct`` (the upstream), then the gateways."""
    headers: dict[str, dict[str, str]]
    """What each target's requests must carry (LiteLLM's master key)."""
    upstream_port: int


@contextmanager
def running_targets(
    modes: Sequence[str],
    litellm_command: str | None,
    chunks: int,
    *,
    record: bool = False,
    first_byte_delay_ms: float = 0.0,
    chunk_delay_ms: float = 0.0,
) -> Iterator[Targets]:
    """The fake upstream, ``llmrouter serve`` in each of ``modes`` in front of it, and
    LiteLLM (given its command) in those it has a counterpart of, each started once the
    one before listens; all stopped at the end (those started, when one fails to start)."""
    with tempfile.TemporaryDirectory(prefix="llmrouter-bench-") as tmp:
        workdir = Path(tmp)
        targets = Targets({}, {}, free_port())
        try:
            targets.children["direct"] = start_upstream(
                targets.upstream_port,
                chunks,
                record=record,
                first_byte_delay_ms=first_byte_delay_ms,
                chunk_delay_ms=chunk_delay_ms,
                log=workdir / "upstream.log",
            )
            for mode in modes:
                config = _config(targets.upstream_port, _mode_config(mode, workdir))
                child = targets.children[gateway_target(mode)] = _start_gateway(config, workdir, mode)
                if config["accounting"]["enabled"]:
                    targets.headers[gateway_target(mode)] = api_key_headers(child.port)
            if litellm_command is not None:
                for mode in litellm_modes(modes):
                    target = litellm.target_name(mode)
                    targets.children[target] = litellm.start_litellm(
                        litellm_command, targets.upstream_port, workdir, mode, MODEL
                    )
                    targets.headers[target] = litellm.AUTH_HEADERS
            yield targets
        finally:
            for child in targets.children.values():
                child.stop()


def api_key_headers(port: int) -> dict[str, str]:
    """The ``Authorization`` header of a new API key of the gateway on ``port``: with
    accounting on, requests are measured as a deployment serves them, each one's key
    verified and its row the key's (not the fresh install's open door, where the gateway
    looks for a first key on every request). The first key needs none to create."""
    answer = httpx.post(
        f"http://127.0.0.1:{port}/v1/admin/keys", json={"name": "bench", "scopes": ["user"]}, timeout=30
    )
    answer.raise_for_status()
    return {"Authorization": f"Bearer {answer.json()['secret']}"}


def litellm_modes(modes: Sequence[str]) -> list[str]:
    """The modes of ``modes`` LiteLLM is measured in (those it has a counterpart of)."""
    return [mode for mode in modes if mode in litellm.MODES]


def _measure_all(
    children: dict[str, Child],
    headers: dict[str, dict[str, str]],
    concurrencies: Sequence[int],
    duration: float,
    rounds: int,
    idle_rss: dict[str, float],
    progress: Callable[[str], None],
) -> list[GatewayRow]:
    cells: dict[tuple[str, bool, int], tuple[list[LoadResult], list[float | None]]] = {}
    for stream in (False, True):
        for c in concurrencies:
            for n in range(rounds):
                for target, child in children.items():
                    progress(f"{target} stream={stream} c={c} round {n + 1}/{rounds}")
                    direct = target == "direct"
                    result, cpu = _round(
                        child.port, stream, c, duration, None if direct else child, headers.get(target)
                    )
                    results, cpus = cells.setdefault((target, stream, c), ([], []))
                    results.append(result)
                    if not direct:
                        cpus.append(cpu)  # None too: one entry a round
    rows: list[GatewayRow] = []
    for target, child in children.items():
        direct = target == "direct"
        for stream in (False, True):
            for c in concurrencies:
                results, cpus = cells[(target, stream, c)]
                direct_p50 = None if direct else _p50_ms(cells[("direct", stream, c)][0])
                rss = None if direct else child.rss_mb()
                rows.append(_row(target, stream, c, results, cpus, rss, direct_p50))
        if not direct:
            rows.append(_idle_row(f"{target} idle", idle_rss[target]))
    _compare_with_bare(rows)
    return rows


def _bare_of(target: str) -> str:
    """The bare target of ``target``'s gateway: llmrouter's or LiteLLM's."""
    return litellm.target_name("bare") if litellm.litellm_mode(target) else BARE_TARGET


def _compare_with_bare(rows: list[GatewayRow]) -> None:
    """Fill ``cpu_vs_bare`` and ``cpu_ms_over_bare`` of every measured gateway row but
    the bare ones, against the same gateway's bare (llmrouter's or LiteLLM's): round by
    round."""
    bare = {
        (r.target, r.stream, r.concurrency): r.cpu_ms_rounds for r in rows if r.target == _bare_of(r.target)
    }
    for row in rows:
        base = bare.get((_bare_of(row.target), row.stream, row.concurrency))
        if row.target == _bare_of(row.target) or not row.cpu_ms_rounds or base is None:
            continue
        pairs = round_pairs(row.cpu_ms_rounds, base)
        if pairs:
            row.cpu_vs_bare = median([cpu / b for cpu, b in pairs]) - 1
            row.cpu_ms_over_bare = median([cpu - b for cpu, b in pairs])


def _p50_ms(results: list[LoadResult]) -> float:
    """The median over rounds of each round's p50 latency, in ms."""
    return median([percentile(r.latencies, 50) for r in results]) * 1000


def import_time_ms(samples: int = 5) -> float:
    """Median wall time of ``import llmrouter`` in a fresh interpreter, minus bare start-up."""

    def run(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - started

    bare = median([run("pass") for _ in range(samples)])
    loaded = median([run("import llmrouter") for _ in range(samples)])
    return (loaded - bare) * 1000


def format_rows(rows: Sequence[GatewayRow]) -> str:
    headers = [
        "target",
        "stream",
        "conc",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "ttfb p50",
        "added p50",
        "cpu ms/req",
        "cpu vs bare",
        "cpu +ms",
        "rss MB",
        "errors",
    ]
    table = [
        [
            r.target,
            "yes" if r.stream else "no",
            r.concurrency or "-",
            r.rps,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.ttfb_p50_ms,
            r.added_p50_ms if r.added_p50_ms is not None else float("nan"),
            r.cpu_ms_per_req if r.cpu_ms_per_req is not None else float("nan"),
            f"{r.cpu_vs_bare:+.0%}" if r.cpu_vs_bare is not None else "-",
            f"{r.cpu_ms_over_bare:+.2f}" if r.cpu_ms_over_bare is not None else "-",
            r.rss_mb if r.rss_mb is not None else float("nan"),
            r.errors,
        ]
        for r in rows
    ]
    return render_table(headers, table)


def rows_as_dicts(rows: Sequence[GatewayRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
