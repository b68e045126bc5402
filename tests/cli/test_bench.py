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


def test_the_median_of_rounds_leaves_out_a_round_that_measured_nothing() -> None:
    # Before: statistics.median with a NaN among the rounds answered by their order.
    import itertools
    import math

    from llmrouter.bench.stats import median

    for rounds in itertools.permutations([math.nan, 5.0, 3.0]):
        assert median(rounds) == 4.0
    assert math.isnan(median([math.nan, math.nan])) and math.isnan(median([]))


def test_the_gateway_bench_gives_the_process_its_cores_back() -> None:
    # The provider bench that runs after it in the same command ran on one core (torch
    # with one thread: a quarter fewer tokens/s).
    import os

    from llmrouter.bench.processes import pinned

    before = os.sched_getaffinity(0)
    with pinned(1):
        assert len(os.sched_getaffinity(0)) == (1 if len(before) > 1 else len(before))
    assert os.sched_getaffinity(0) == before


def test_json_results_write_null_for_nothing_measured_and_modes_once() -> None:
    import json
    import math

    from llmrouter.bench.cli import _modes, _without_nan

    text = json.dumps(_without_nan({"rows": [{"rps": math.nan, "p50": 1.5}]}), allow_nan=False)
    assert json.loads(text) == {"rows": [{"rps": None, "p50": 1.5}]}  # before: NaN, not JSON
    assert _modes("bare,full,bare") == ["bare", "full"]  # before: a second bare left running
