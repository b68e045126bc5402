"""Where the gateway's CPU goes by thread: user and system time, context switches and
page faults per request, for each mode of ``llmrouter bench``.

Usage::

    .venv/bin/python benchmarks/gateway_threads.py [--modes bare,accounting,cache,metrics,full]
        [--concurrency 16] [--stream] [--rounds 3] [--duration 3]

``llmrouter bench`` reports the gateway process's CPU as one figure. This reads each
thread's counters from ``/proc/PID/task/TID/stat`` and ``status`` (Linux) around every
measured round, so that what a mode adds can be split into the event loop's thread and
the others (the ledger's SQLite writer), into user and system time, and set next to the
context switches and the minor page faults (first touches of fresh memory: a cache
growing, the journal's mapped pages) it causes. The set-up is the bench's: the fake
upstream and the gateways on the first core, this load generator on the second; every
mode is measured once per round, in turn.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from llmrouter.bench.gateway import _config, _mode_config, _round, _start_gateway, start_upstream
from llmrouter.bench.processes import Child, free_port, pin_self
from llmrouter.bench.stats import render_table

_TICK = os.sysconf("SC_CLK_TCK")
Counters = tuple[float, float, int, int, int]
"""User seconds, system seconds, voluntary and involuntary context switches, minor faults."""


def thread_counters(pid: int) -> dict[int, Counters]:
    """Every thread's counters, by thread id (threads that end while read are left out)."""
    counters: dict[int, Counters] = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        tid = int(name)
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except FileNotFoundError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
        switches = dict(
            line.split(":\t") for line in status.splitlines() if line.endswith(tuple("0123456789"))
        )
        counters[tid] = (
            int(fields[11]) / _TICK,  # utime
            int(fields[12]) / _TICK,  # stime
            int(switches["voluntary_ctxt_switches"]),
            int(switches["nonvoluntary_ctxt_switches"]),
            int(fields[7]),  # minflt
        )
    return counters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="bare,accounting,cache,metrics,full")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stream", action="store_true", help="20-chunk streams instead of JSON answers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds a round measures each mode")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    pin_self(1)
    totals: dict[str, dict[str, list[float]]] = {mode: defaultdict(lambda: [0.0] * 5) for mode in modes}
    requests = dict.fromkeys(modes, 0)
    with tempfile.TemporaryDirectory(prefix="llmrouter-threads-") as tmp:
        workdir, port = Path(tmp), free_port()
        upstream = start_upstream(port, chunks=20)
        gateways: dict[str, Child] = {}
        try:
            for mode in modes:
                gateways[mode] = _start_gateway(_config(port, _mode_config(mode, workdir)), workdir, mode)
            for n in range(args.rounds):
                for mode, gateway in gateways.items():
                    print(f"round {n + 1}/{args.rounds}: {mode}", file=sys.stderr)
                    pid = gateway.process.pid
                    before = thread_counters(pid)
                    result, _ = _round(gateway.port, args.stream, args.concurrency, args.duration, None)
                    after = thread_counters(pid)
                    requests[mode] += result.total
                    for tid, counters in after.items():
                        # Threads are named by role: the main thread runs the event loop.
                        name = "event loop" if tid == pid else f"thread {sorted(after).index(tid)}"
                        start = before.get(tid, (0.0, 0.0, 0, 0, 0))
                        row = totals[mode][name]
                        for i, (new, old) in enumerate(zip(counters, start, strict=True)):
                            row[i] += new - old
        finally:
            for gateway in gateways.values():
                gateway.stop()
            upstream.stop()

    rows: list[list[object]] = []
    for mode in modes:
        count = max(requests[mode], 1)
        for name, (user, system, voluntary, involuntary, faults) in totals[mode].items():
            if user or system:  # threads that ran while measured (an idle pool thread did not)
                rows.append(
                    [mode, name, user / count * 1e6, system / count * 1e6, voluntary / count,
                     involuntary / count, faults / count]
                )  # fmt: skip
    kind = "stream" if args.stream else "JSON"
    print(f"{kind} requests at concurrency {args.concurrency}, per request:")
    print(
        render_table(
            ["mode", "thread", "user µs", "system µs", "voluntary cs", "involuntary cs", "minor faults"], rows
        )
    )


if __name__ == "__main__":
    main()
