"""What accounting, cache and metrics cost the gateway, in CPU instructions per request.

Usage::

    .venv/bin/python benchmarks/gateway_instructions.py [--modes bare,accounting,cache,metrics,full]
        [--kinds json,stream] [--requests 640] [--jobs 2] [--without all|PART,...]

Needs valgrind (``apt-get install valgrind``). ``llmrouter bench`` measures CPU time,
which on a shared virtual machine drifts by a third over minutes; instruction counts do
not drift, so a change of a few percent shows. Each gateway configuration of ``llmrouter
bench`` (``--modes``) runs in a child process under ``valgrind --tool=cachegrind``:
the service's ASGI app is called in process (no client sockets, so the figure is the
app's own work plus the upstream call, without uvicorn), 16 requests at a time, against
the fake upstream (20 chunks per stream) in a process of its own. The child runs twice,
with ``--warmup`` requests and with ``--warmup`` + ``--requests``; the difference over
``--requests`` is the instructions one request costs, start-up excluded. Work in the
kernel (system calls, the socket writes) is not counted. Children run with
``PYTHONHASHSEED=0``: with random seeds, dict and set layouts moved a mode's figure by
up to ~15k instructions run to run; with a fixed one, repeated runs agree within ~1k.

``--without`` also runs full mode with each named part of it (:data:`PARTS`) replaced by a
stand-in that does nothing, and prints what full mode saves without it: what the part
costs a request, everything it calls included.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import itertools
import json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llmrouter.bench.gateway import MODEL, _config, _mode_config, start_upstream
from llmrouter.bench.processes import free_port, python_argv
from llmrouter.bench.stats import render_table

CONCURRENCY = 16
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


# --- parts of full mode, each replaced in turn by a stand-in (--without) --------------------


async def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


_keys = itertools.count()
_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

PARTS: dict[str, tuple[str, str, Any]] = {
    "ledger-row": (
        "the ledger row: built, fitted, journaled, queued, inserted",
        "llmrouter.accounting.hooks:AccountingHooks._record",
        # The request's in-flight line still ends (its entry would pile up otherwise).
        lambda self, ctx, entry_id=None, **kwargs: self.ledger._open.pop(entry_id, None),
    ),
    "ledger-insert": (
        "the SQLite insert in its worker thread, with fitting the values",
        "llmrouter.accounting.ledger:default_sink",
        lambda engine: (_nothing, lambda: None),
    ),
    "fitting": (
        "fitting a row's values to their columns",
        "llmrouter.accounting.entry:_fits",
        lambda values: True,
    ),
    "journal": (
        "the row's journal line",
        "llmrouter.accounting.journal:Journal.append",
        lambda self, row: self.segment,
    ),
    "in-flight-line": (
        "the journal line of a request in flight (built and copied in)",
        "llmrouter.accounting.ledger:LedgerWriter.open",
        lambda self, request: None,
    ),
    "cache-key": (
        "the cache key: canonical request, JSON, SHA-256 (a new key each time, as here)",
        "llmrouter.cache.layer:cache_key",
        lambda request, group, namespace=None: f"chat:{next(_keys)}",
    ),
    "flight": (
        "the flight that coalesces identical requests",
        "llmrouter.cache.layer:ResponseCache._can_coalesce",
        lambda self: False,
    ),
    "cache-store": (
        "storing the answer in the cache",
        "llmrouter.cache.layer:ResponseCache._store",
        _nothing,
    ),
    "entry-encoding": (
        "the msgpack encoding of a cache entry",
        "llmrouter.cache.layer:encode_entry",
        # encode_entry's own signature (its ``group`` too: a stand-in without it raised,
        # and every store logged a traceback), returning a valid entry made once:
        # msgpack of {"response": {"choices": [{"message": {"role": "assistant",
        # "content": "x"}, "finish_reason": "stop"}]}}, which decode_entry reads.
        lambda *, response=None, chunks=None, group=None: (
            b"\x81\xa8response\x81\xa7choices\x91\x82\xa7message\x82\xa4role\xa9assistant"
            b"\xa7content\xa1x\xadfinish_reason\xa4stop"
        ),
    ),
    "memory-set": ("the memory backend's set", "llmrouter.cache.memory:MemoryBackend.set", _nothing),
    "telemetry-admission": (
        "the telemetry hooks' before_request",
        "llmrouter.telemetry.hooks:TelemetryHooks.before_request",
        _nothing,
    ),
    "traceparent": (
        "a new traceparent for a request without one",
        "llmrouter.telemetry.hooks:new_traceparent_header",
        lambda: _TRACEPARENT,
    ),
    "metrics-record": (
        "the metrics of a finished request",
        "llmrouter.telemetry.hooks:TelemetryHooks._record",
        lambda self, ctx, chunk_times=None: None,
    ),
    "admission": (
        "accounting's admission: key, limits, budget",
        "llmrouter.accounting.hooks:AccountingHooks.before_request",
        _nothing,
    ),
    "authentication": (
        "authentication: the request's API key verified",
        "llmrouter.accounting.extension:AccountingExtension.authenticate",
        _nothing,
    ),
}
"""What ``--without`` can replace: name -> (what it is, ``module:attribute``, its stand-in)."""


def resolve(target: str) -> tuple[Any, str]:
    """The owner of ``module:Owner.attribute`` (or ``module:attribute``) and the
    attribute's name; AttributeError when the code no longer has it."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *owners, attribute = path.split(".")
    for name in owners:
        owner = getattr(owner, name)
    if not hasattr(owner, attribute):
        raise AttributeError(f"{target} is gone: update PARTS")
    return owner, attribute


def _replace(target: str, stand_in: Any) -> None:
    setattr(*resolve(target), stand_in)


# --- the child: the app in process ------------------------------------------------------


def _scope(body: bytes, path: str, authorization: bytes | None) -> dict[str, Any]:
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if authorization is not None:
        headers.append((b"authorization", authorization))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "headers": headers,
        "state": {},
    }


async def _request(
    app: Any,
    body: bytes,
    *,
    path: str = "/v1/chat/completions",
    authorization: bytes | None = None,
    expect: int = 200,
    answer: list[bytes] | None = None,
) -> None:
    """One request as an ASGI server makes it; the client stays until the answer ends
    (whose body goes to ``answer`` when given)."""
    answered = asyncio.Event()
    sent_body = False
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message["type"] == "http.response.body":
            if answer is not None:
                answer.append(message.get("body", b""))
            if not message.get("more_body"):
                answered.set()

    await app(_scope(body, path, authorization), receive, send)
    if status != [expect]:
        raise RuntimeError(f"the gateway answered {status}")


async def _api_key(app: Any) -> bytes:
    """The ``Authorization`` value of a new key (the first needs none to create): with
    accounting on, requests are measured as a deployment serves them, each one's key
    verified, as ``llmrouter bench`` does (:func:`llmrouter.bench.gateway.api_key_headers`)."""
    answer: list[bytes] = []
    body = b'{"name": "bench", "scopes": ["user"]}'
    await _request(app, body, path="/v1/admin/keys", expect=201, answer=answer)
    return b"Bearer " + json.loads(b"".join(answer))["secret"].encode()


async def _lifespan(app: Any) -> Any:
    """Start the app's lifespan; returns what shuts it down."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the app did not start: {started}")

    async def shutdown() -> None:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task

    return shutdown


async def _child(mode: str, stream: bool, requests: int, upstream_port: int) -> None:
    from llmrouter.config import parse_config
    from llmrouter.server.app import create_app, default_extensions
    from llmrouter.telemetry.logging import configure_logging

    with tempfile.TemporaryDirectory(prefix="llmrouter-instructions-") as tmp:
        raw = _config(upstream_port, _mode_config(mode, Path(tmp)))
        raw["telemetry"]["access_log"] = False
        if "ledger" in raw["accounting"]:
            # Under valgrind the default 0.25 s between ledger writes holds ~10 requests;
            # a loaded gateway writes full batches (200 rows), as the child now does.
            raw["accounting"]["ledger"]["flush_interval"] = 3600.0
            # Likewise a verified key is read from the database again after 5 s: every
            # few dozen requests at valgrind's pace, every ten thousand at the gateway's.
            raw["accounting"]["auth"] = {"cache_seconds": 3600.0}
        config = parse_config(raw)
        if config.telemetry.json_logs:
            configure_logging(config.telemetry.log_level)  # as `llmrouter serve` does
        app = create_app(config, extensions=default_extensions(config))
        shutdown = await _lifespan(app)
        authorization = await _api_key(app) if config.accounting.enabled else None
        numbers = itertools.count()
        tail = ',"stream":true' if stream else ""

        async def worker(count: int) -> None:
            for _ in range(count):
                # A different prompt every time: with the cache on, a miss and a store.
                body = (
                    f'{{"model":"{MODEL}","temperature":0,"max_tokens":64,"messages":'
                    f'[{{"role":"user","content":"Say hello, request {os.getpid()}-{next(numbers)}."}}]{tail}}}'
                )
                await _request(app, body.encode(), authorization=authorization)

        await asyncio.gather(*(worker(requests // CONCURRENCY) for _ in range(CONCURRENCY)))
        await asyncio.sleep(0.3)  # let the ledger writer and the cache's stores finish
        await shutdown()


# --- the parent: valgrind runs and the table ----------------------------------------------


def _instructions(mode: str, stream: bool, requests: int, upstream_port: int, without: str = "-") -> int:
    argv = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        *python_argv(
            __file__,
            "--child",
            mode,
            "stream" if stream else "json",
            str(requests),
            str(upstream_port),
            without,
        ),
    ]
    # A fixed hash seed: dict and set layouts, and so the instructions, repeat run to run.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    found = _REFS.search(result.stderr)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"{mode} (without {without}) under valgrind failed:\n{result.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="bare,accounting,cache,metrics,full")
    parser.add_argument("--kinds", default="json,stream", help="json, stream or both")
    parser.add_argument("--requests", type=int, default=640, help="measured requests per run")
    parser.add_argument("--warmup", type=int, default=160, help="requests before them")
    parser.add_argument("--jobs", type=int, default=2, help="valgrind runs at once")
    parser.add_argument(
        "--without",
        default="",
        help=f"parts of full mode to replace in turn: all, or some of {', '.join(PARTS)}",
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, kind, requests, port, without = args.child
        if without != "-":
            _replace(*PARTS[without][1:])
        import uvloop

        uvloop.run(_child(mode, kind == "stream", int(requests), int(port)))
        return

    if args.requests % CONCURRENCY or args.warmup % CONCURRENCY:
        parser.error(f"--requests and --warmup must be multiples of {CONCURRENCY}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    kinds = {k.strip() for k in args.kinds.split(",") if k.strip()}
    if not kinds or not kinds <= {"json", "stream"}:
        parser.error("--kinds takes json, stream or both")
    parts = (
        list(PARTS) if args.without == "all" else [p.strip() for p in args.without.split(",") if p.strip()]
    )
    if unknown := [p for p in parts if p not in PARTS]:
        parser.error(f"--without: no part {', '.join(unknown)} (known: {', '.join(PARTS)})")
    if parts and "full" not in modes:
        modes.append("full")  # what the parts are measured against
    streams = [s for s, kind in ((False, "json"), (True, "stream")) if kind in kinds]
    configurations = [(m, "-") for m in modes] + [("full", p) for p in parts]
    port = free_port()
    upstream = start_upstream(port, chunks=20)
    try:
        runs = [
            (mode, stream, n, without)
            for mode, without in configurations
            for stream in streams
            for n in (args.warmup, args.warmup + args.requests)
        ]
        with ThreadPoolExecutor(args.jobs) as pool:
            counts = dict(
                zip(runs, pool.map(lambda r: _instructions(r[0], r[1], r[2], port, r[3]), runs), strict=True)
            )
    finally:
        upstream.stop()
    per_request = {
        (mode, without, s): (
            counts[(mode, s, args.warmup + args.requests, without)] - counts[(mode, s, args.warmup, without)]
        )
        / args.requests
        / 1000
        for mode, without in configurations
        for s in streams
    }
    rows: list[list[object]] = []
    for mode in modes:
        row: list[object] = [mode]
        for stream in streams:
            value = per_request[(mode, "-", stream)]
            base = per_request.get(("bare", "-", stream))
            row += [value, f"{100 * (value / base - 1):+.1f}%" if base else "-"]
        rows.append(row)
    headers = ["mode"]
    for stream in streams:
        headers += ["stream k instr/req" if stream else "JSON k instr/req", "vs bare"]
    print(render_table(headers, rows))
    if parts:
        rows = []
        for part in parts:
            row = [part, PARTS[part][0]]
            for stream in streams:
                value = per_request[("full", part, stream)]
                row += [value, value - per_request[("full", "-", stream)]]
            rows.append(row)
        headers = ["full without", "what"]
        for stream in streams:
            headers += ["stream k instr/req" if stream else "JSON k instr/req", "k change"]
        print()
        print(render_table(headers, rows))


if __name__ == "__main__":
    main()
