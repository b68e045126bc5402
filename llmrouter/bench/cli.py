"""``llmrouter bench``: registered into the main CLI by :func:`register`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from types import FrameType
from typing import Any

from llmrouter.errors import ConfigError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure gateway overhead (direct vs through llmrouter serve) and local providers",
        description="Gateway overhead against a fast fake upstream on loopback: req/s, p50/p90/p99, "
        "time to first token, added latency, gateway CPU per request and RSS. With --litellm, LiteLLM's "
        "proxy beside it; with --coalescing, the upstream calls a burst of identical requests makes. "
        "With --providers, also local providers against their libraries: tokens/s and time to first token.",
    )
    parser.add_argument(
        "--concurrency", type=_counts, default="1,16,64", help="comma-separated (default 1,16,64)"
    )
    parser.add_argument("--duration", type=_seconds, default=3.0, help="seconds per measured round")
    parser.add_argument("--rounds", type=_count, default=3, help="rounds per cell; the table shows medians")
    parser.add_argument("--chunks", type=_count, default=20, help="content chunks per streamed answer")
    parser.add_argument(
        "--first-byte-delay-ms",
        type=_milliseconds,
        default=0.0,
        help="the fake upstream waits this long before its response headers (default 0)",
    )
    parser.add_argument(
        "--chunk-delay-ms",
        type=_milliseconds,
        default=0.0,
        help="the fake upstream waits this long before each content chunk of a stream after the "
        "first, and a JSON answer that per chunk (default 0)",
    )
    parser.add_argument(
        "--modes",
        type=_modes,
        default="bare,full",
        help="gateway configurations: bare (accounting, cache, metrics off), full (all on), "
        "or accounting / cache / metrics alone",
    )
    parser.add_argument(
        "--json", dest="json_path", type=_writable, default=None, help="also write the results as JSON here"
    )
    parser.add_argument("--no-gateway", action="store_true", help="skip the gateway overhead benchmark")
    parser.add_argument(
        "--litellm",
        metavar="COMMAND",
        type=_command,
        default=None,
        help="also measure LiteLLM's proxy, started with this `litellm` command (its own environment: "
        "scripts/setup-litellm-env), in the modes it has a counterpart of (bare, cache, metrics, full)",
    )
    parser.add_argument(
        "--coalescing",
        metavar="N",
        type=_count,
        default=None,
        help="also send N identical requests at once to llmrouter with its cache (and LiteLLM's, with "
        "--litellm) and count the upstream calls each makes",
    )
    local = parser.add_argument_group(
        "local providers",
        "tokens/s and time to first token through the provider and through the library alone",
    )
    local.add_argument(
        "--providers", default="", help="comma-separated local providers to measure: transformers, vllm"
    )
    local.add_argument(
        "--provider-model",
        default=None,
        help="model directory or hub id (default: SmolLM2 for transformers, a tiny Llama for vllm; "
        "'tiny' for transformers: a tiny random Llama)",
    )
    local.add_argument(
        "--provider-concurrency", type=_counts, default="1,4,8", help="comma-separated (default 1,4,8)"
    )
    local.add_argument(
        "--provider-tokens", type=_count, default=32, help="tokens generated per request (default 32)"
    )
    local.add_argument(
        "--provider-requests",
        type=_count,
        default=8,
        help="requests per run, in waves of the concurrency (default 8)",
    )
    parser.set_defaults(func=_run)


def _count(text: str) -> int:
    """A whole number of at least 1 (argparse reports the error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def _counts(text: str) -> list[int]:
    """Comma-separated whole numbers of at least 1, at least one of them, each once in
    the order given (``2,2``: a second row and round of the same cell is only time)."""
    values = list(dict.fromkeys(_count(part) for part in text.split(",") if part.strip()))
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _modes(text: str) -> list[str]:
    """Comma-separated gateway configurations, checked before anything runs."""
    from llmrouter.bench.gateway import MODES

    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))  # bare,bare: one
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(MODES)}, not {text!r}")
    return modes


def _writable(path: str) -> str:
    """A file the results can be written to once the benchmark is over (checked first, so
    that a typo in its folder does not throw a run of minutes away)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write a file at {path!r}")
    return path


def _command(text: str) -> str:
    """An executable file (checked first, like the JSON path)."""
    path = shutil.which(text)
    if path is None:
        raise argparse.ArgumentTypeError(f"no executable {text!r}")
    return path


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


def _milliseconds(text: str) -> float:
    """A delay: a finite number of milliseconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds, 0 or more, not {text!r}")
    return value


@contextmanager
def _cleanup_on_sigterm() -> Iterator[None]:
    """SIGTERM (a cancelled CI job, ``kill PID``, a service stop) as ``SystemExit(143)``
    while the bench runs: Python's default for it ends the process where it stands, and
    the upstream and gateways it started go on running, their temporary folder left
    behind; an exception runs the ``finally`` blocks that stop them and remove it. The
    previous handler is back afterwards (``main`` may be called by a longer program)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress(total: int) -> Any:
    done = [0]

    def step(label: str) -> None:
        done[0] += 1
        filled = int(30 * done[0] / total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done[0]}/{total} {label:<48}")
        sys.stderr.flush()

    return step


def _run(args: argparse.Namespace) -> int:
    with _cleanup_on_sigterm():
        return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    from llmrouter.bench.compare import compare_with_litellm, comparisons_as_dicts, format_comparisons
    from llmrouter.bench.gateway import (
        format_rows,
        import_time_ms,
        litellm_modes,
        rows_as_dicts,
        run_gateway_bench,
    )

    concurrencies: list[int] = args.concurrency
    modes: list[str] = args.modes
    providers = [p for p in args.providers.split(",") if p]
    provider_concurrencies: list[int] = args.provider_concurrency
    if args.litellm and args.no_gateway and not args.coalescing:
        raise ConfigError("--litellm measures a gateway: drop --no-gateway, or add --coalescing")
    if args.litellm and not args.no_gateway and not litellm_modes(modes):
        raise ConfigError(f"--litellm: LiteLLM has no counterpart of --modes {','.join(modes)}")
    targets = 1 + len(modes) + (len(litellm_modes(modes)) if args.litellm else 0)
    windows = 0 if args.no_gateway else 2 * len(concurrencies) * targets * args.rounds
    windows += 2 * len(providers) * len(provider_concurrencies) * args.rounds
    windows += 2 * (3 if args.litellm else 2) if args.coalescing else 0
    if args.no_gateway and not providers and not args.coalescing:
        raise ConfigError("nothing to measure: --no-gateway without --providers or --coalescing")
    if providers:
        from llmrouter.bench.providers import load_bench

        for name in providers:  # before anything runs: a typo fails now, not after the gateway
            load_bench(name)
    progress = _progress(max(1, windows))
    results: dict[str, Any] = {}
    if not args.no_gateway:
        rows = run_gateway_bench(
            concurrencies=concurrencies,
            duration=args.duration,
            rounds=args.rounds,
            chunks=args.chunks,
            modes=modes,
            litellm_command=args.litellm,
            first_byte_delay_ms=args.first_byte_delay_ms,
            chunk_delay_ms=args.chunk_delay_ms,
            progress=progress,
        )
        results["gateway"] = rows_as_dicts(rows)
        comparisons = compare_with_litellm(rows)
        if comparisons:
            results["litellm_comparison"] = comparisons_as_dicts(comparisons)
        results["import_ms"] = import_time_ms()
    if args.coalescing:
        from llmrouter.bench.coalescing import burst_rows_as_dicts, run_coalescing_bench

        burst_rows = run_coalescing_bench(
            requests=args.coalescing, chunks=args.chunks, litellm_command=args.litellm, progress=progress
        )
        results["coalescing"] = burst_rows_as_dicts(burst_rows)
    if providers:
        import anyio

        from llmrouter.bench.providers import format_provider_rows, provider_rows_as_dicts, run_provider_bench

        provider_rows = anyio.run(
            partial(
                run_provider_bench,
                providers,
                model=args.provider_model,
                concurrencies=provider_concurrencies,
                tokens=args.provider_tokens,
                requests=args.provider_requests,
                rounds=args.rounds,
                progress=progress,
            )
        )
        results["providers"] = provider_rows_as_dicts(provider_rows)
    sys.stderr.write("\n")
    if not args.no_gateway:
        print(format_rows(rows))
        if comparisons:
            print("\nllmrouter against LiteLLM (the same mode):\n" + format_comparisons(comparisons))
        print(f"\nimport llmrouter: {results['import_ms']:.0f} ms")
    if args.coalescing:
        from llmrouter.bench.coalescing import DELAY_MS, format_burst_rows

        title = (
            f"{args.coalescing} identical requests at once, the upstream answering after {DELAY_MS:.0f} ms:"
        )
        print(("\n" if not args.no_gateway else "") + title + "\n" + format_burst_rows(burst_rows))
    if providers:
        print(("\n" if not args.no_gateway or args.coalescing else "") + format_provider_rows(provider_rows))
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump(_without_nan(results), out, indent=2, default=str)
    return 0


def _without_nan(value: Any) -> Any:
    """``value`` with NaN (a cell with nothing measured) as None: ``null`` in the JSON,
    where Python's ``NaN`` is not JSON, and strict parsers refuse the file."""
    if isinstance(value, float):
        return None if value != value else value
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nan(item) for item in value]
    return value
