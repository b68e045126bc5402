"""``llmrouter bench`` when things go wrong: a target that dies mid-run, a SIGTERM, an
environment meant for another server; and the options of its upstream."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llmrouter.bench import gateway
from llmrouter.bench.compare import compare_with_litellm
from llmrouter.bench.gateway import GatewayRow, _compare_with_bare, _measure_all, format_rows, start_upstream
from llmrouter.bench.loadgen import http_request, send_at_once
from llmrouter.bench.processes import Child, free_port, python_argv


def _row(target: str, rounds: list[float | None]) -> GatewayRow:
    return GatewayRow(target, False, 4, 100.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 50.0, 0, cpu_ms_rounds=rounds)


def test_rounds_are_compared_round_by_round_leaving_out_those_a_target_answered_nothing_in() -> None:
    # Before: the round with no answer was dropped, so the lists were of unequal lengths:
    # against bare, zip(strict=True) raised; against LiteLLM, round 2 met round 1.
    rows = [
        _row("gateway[bare]", [0.2, 0.5]),
        _row("gateway[full]", [0.3, None]),
        _row("litellm[bare]", [None, 10.0]),
    ]
    _compare_with_bare(rows)
    assert rows[1].cpu_vs_bare == pytest.approx(0.5) and rows[1].cpu_ms_over_bare == pytest.approx(0.1)
    [bare] = compare_with_litellm(rows)
    assert bare.litellm_cpu_ratio == pytest.approx(20.0)  # round 2's 10 / 0.5, not 10 / 0.2


def _upstream() -> Child:
    return start_upstream(free_port(), 3)


def test_a_target_that_dies_mid_run_is_its_errors_not_the_end_of_the_bench() -> None:
    # Fake upstreams stand in for the gateways (a quicker start); "gateway[full]" is
    # killed after its first round.
    children = {"direct": _upstream(), "gateway[bare]": _upstream(), "gateway[full]": _upstream()}
    dying = children["gateway[full]"]

    def progress(label: str) -> None:
        if label.startswith("direct stream=False c=1 round 2/2"):
            dying.process.kill()

    try:
        idle = {target: child.rss_mb() for target, child in children.items()}
        rows = _measure_all(children, {}, [1], 0.2, 2, idle, progress)
    finally:
        for child in children.values():
            child.stop()
    full = {row.stream: row for row in rows if row.target == "gateway[full]"}
    assert len(full[False].cpu_ms_rounds) == 2 and full[False].cpu_ms_rounds[1] is None
    assert full[False].cpu_vs_bare is not None  # its first round, against bare's first
    assert full[True].cpu_ms_rounds == [None, None] and full[True].cpu_ms_per_req is None
    assert full[True].cpu_vs_bare is None and full[True].errors >= 2 and full[False].errors >= 1
    line = next(
        line for line in format_rows(rows).splitlines() if "gateway[full]" in line and " yes " in line
    )
    assert line.split()[4:8] == ["-", "-", "-", "-"]  # p50, p90, p99, ttfb: nothing measured


def test_the_benched_servers_get_no_llmrouter_overrides(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: LLMROUTER__SERVER__WORKERS=2 in the shell made each gateway uvicorn's
    # supervisor, whose CPU and RSS the bench then reported.
    monkeypatch.setenv("LLMROUTER__SERVER__WORKERS", "2")
    monkeypatch.setenv("LLMROUTER_TRANSFORMERS_MODEL", "tiny")
    monkeypatch.setenv("BENCH_TEST_KEPT", "yes")
    out = tmp_path / "env.json"
    code = f"import json, os; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))"
    child = Child(python_argv("-c", code), 0, env={"EXTRA": "1"})
    child.process.wait(timeout=30)
    child.stop()
    env = json.loads(out.read_text())
    assert "LLMROUTER__SERVER__WORKERS" not in env and "LLMROUTER_TRANSFORMERS_MODEL" not in env
    assert env["BENCH_TEST_KEPT"] == "yes" and env["EXTRA"] == "1"
    argv = gateway.gateway_argv(tmp_path / "bare.yaml", 8000, access_log=False)
    assert argv[argv.index("--workers") + 1] == "1"  # whatever the config says


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text()
        except (OSError, ValueError):
            continue
        if f"\nPPid:\t{pid}\n" in status:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_sigterm_stops_the_servers_and_removes_their_folder(tmp_path: Path) -> None:
    # Before: SIGTERM ended the bench at once; the upstream and the gateway went on
    # running, and /tmp/llmrouter-bench-* stayed.
    bench = subprocess.Popen(
        [sys.executable, "-m", "llmrouter.cli", "bench", "--concurrency", "1", "--rounds", "3",
         "--duration", "3", "--modes", "bare"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    children: list[int] = []
    try:
        assert bench.stderr is not None
        progress = bench.stderr.read(3)  # "\r[#": the first round has begun, both servers up
        assert progress.startswith(b"\r["), progress + bench.stderr.read()
        children = _children_of(bench.pid)
        assert len(children) == 2, children
        time.sleep(0.3)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        assert not [pid for pid in children if _alive(pid)]
        assert not list(tmp_path.glob("llmrouter-bench-*"))
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        if bench.stderr is not None:
            bench.stderr.close()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_concurrencies_are_measured_once_each() -> None:
    from llmrouter.bench.cli import _counts

    assert _counts("2,2,1,2") == [2, 1]  # before: a row and the rounds of 2 twice


def test_the_upstream_delays_reach_the_fake_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmrouter.cli import main

    asked: dict[str, Any] = {}

    def fake_bench(**kwargs: Any) -> list[GatewayRow]:
        asked.update(kwargs)
        return []

    monkeypatch.setattr(gateway, "run_gateway_bench", fake_bench)
    monkeypatch.setattr(gateway, "import_time_ms", lambda: 1.0)
    assert (
        main(["bench", "--concurrency", "1", "--first-byte-delay-ms", "40", "--chunk-delay-ms", "2.5"]) == 0
    )
    assert (asked["first_byte_delay_ms"], asked["chunk_delay_ms"]) == (40.0, 2.5)
    with pytest.raises(SystemExit):
        main(["bench", "--chunk-delay-ms", "-1"])

    upstream = start_upstream(free_port(), 3, first_byte_delay_ms=100, chunk_delay_ms=100)
    try:
        port = upstream.port
        body = gateway.body_factory(True)(0)
        [(status, seconds)] = asyncio.run(
            send_at_once("127.0.0.1", port, http_request("127.0.0.1", port, "/v1/chat/completions", body), 1)
        )
    finally:
        upstream.stop()
    assert status == 200 and seconds >= 0.3  # 100 ms before the headers, 100 before chunks 2 and 3
