"""``llmrouter bench`` end to end, on the smallest settings (a smoke test, not a timing)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import median

import pytest


def test_bench_measures_direct_and_gateway_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "llmrouter.cli", "bench", "--concurrency", "2", "--rounds", "2",
         "--duration", "0.4", "--chunks", "3", "--modes", "bare,cache", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (
        "gateway[cache]" in run.stdout
        and "cpu vs bare" in run.stdout
        and "cpu +ms" in run.stdout
        and "import llmrouter:" in run.stdout
    )
    rows = json.loads(out.read_text())["gateway"]
    measured = [row for row in rows if row["concurrency"]]
    assert [(row["target"], row["stream"]) for row in measured] == [
        ("direct", False),
        ("direct", True),
        ("gateway[bare]", False),
        ("gateway[bare]", True),
        ("gateway[cache]", False),
        ("gateway[cache]", True),
    ]
    for row in measured:
        assert row["errors"] == 0 and row["rps"] > 0 and row["p50_ms"] > 0, row
    for row in measured[2:]:
        assert row["cpu_ms_per_req"] > 0 and row["rss_mb"] > 10 and row["added_p50_ms"] is not None
    bare = {row["stream"]: row["cpu_ms_rounds"] for row in measured[2:4]}
    for row in measured[:4]:
        assert row["cpu_vs_bare"] is None and row["cpu_ms_over_bare"] is None
    for row in measured[4:]:
        # The cache's cost: each round against bare's in the same round, then the median.
        assert len(row["cpu_ms_rounds"]) == 2 and row["cpu_ms_per_req"] == pytest.approx(
            median(row["cpu_ms_rounds"])
        )
        ratios = [cpu / base for cpu, base in zip(row["cpu_ms_rounds"], bare[row["stream"]], strict=True)]
        assert row["cpu_vs_bare"] == pytest.approx(median(ratios) - 1)
        differences = [
            cpu - base for cpu, base in zip(row["cpu_ms_rounds"], bare[row["stream"]], strict=True)
        ]
        assert row["cpu_ms_over_bare"] == pytest.approx(median(differences))
    idle = [row for row in rows if row["target"].endswith(" idle")]
    assert len(idle) == 2 and all(row["rss_mb"] > 10 for row in idle)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_children_run_on_another_core_than_the_load_generator() -> None:
    # The bench pins itself (the load generator) first, then starts the upstream and the
    # gateway: they must still go on the first core, not follow it onto the second.
    code = (
        "import json, os, sys\n"
        "from llmrouter.bench.processes import Child, pin_self\n"
        "pin_self(1)\n"
        "child = Child([sys.executable, '-c', 'import time; time.sleep(30)'], 0)\n"
        "print(json.dumps([sorted(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(child.process.pid))]))\n"
        "child.stop()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    load_generator, child = json.loads(run.stdout)
    cores = sorted(os.sched_getaffinity(0))
    assert load_generator == [cores[1]] and child == [cores[0]]
