"""``llmrouter bench``: registered into the main CLI by :func:`register`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure gateway overhead (direct vs through llmrouter serve)",
        description="Gateway overhead against a fast fake upstream on loopback: req/s, p50/p90/p99, "
        "time to first chunk, added latency, gateway CPU per request and RSS.",
    )
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated (default 1,16,64)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measured round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per cell; the table shows medians")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per streamed answer")
    parser.add_argument(
        "--modes",
        default="bare,full",
        help="gateway configurations: bare (accounting, cache, metrics off), full (all on), "
        "or accounting / cache / metrics alone",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    parser.set_defaults(func=_run)


def _progress(total: int) -> Any:
    done = [0]

    def step(label: str) -> None:
        done[0] += 1
        filled = int(30 * done[0] / total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done[0]}/{total} {label:<48}")
        sys.stderr.flush()

    return step


def _run(args: argparse.Namespace) -> int:
    from llmrouter.bench.gateway import format_rows, import_time_ms, rows_as_dicts, run_gateway_bench

    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    windows = 2 * len(concurrencies) * (1 + len(modes)) * args.rounds
    rows = run_gateway_bench(
        concurrencies=concurrencies,
        duration=args.duration,
        rounds=args.rounds,
        chunks=args.chunks,
        modes=modes,
        progress=_progress(windows),
    )
    sys.stderr.write("\n")
    imports = import_time_ms()
    print(format_rows(rows))
    print(f"\nimport llmrouter: {imports:.0f} ms")
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump({"gateway": rows_as_dicts(rows), "import_ms": imports}, out, indent=2, default=str)
    return 0
