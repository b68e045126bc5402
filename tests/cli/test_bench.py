"""``llmrouter bench`` end to end, on the smallest settings (a smoke test, not a timing)."""

import json
import subprocess
import sys
from pathlib import Path


def test_bench_measures_direct_and_gateway_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "llmrouter.cli", "bench", "--concurrency", "2", "--rounds", "2",
         "--duration", "0.4", "--chunks", "3", "--modes", "bare", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "gateway[bare]" in run.stdout and "import llmrouter:" in run.stdout
    rows = json.loads(out.read_text())["gateway"]
    measured = [row for row in rows if row["concurrency"]]
    assert [(row["target"], row["stream"]) for row in measured] == [
        ("direct", False),
        ("direct", True),
        ("gateway[bare]", False),
        ("gateway[bare]", True),
    ]
    for row in measured:
        assert row["errors"] == 0 and row["rps"] > 0 and row["p50_ms"] > 0, row
    for row in measured[2:]:
        assert row["cpu_ms_per_req"] > 0 and row["rss_mb"] > 10 and row["added_p50_ms"] is not None
    idle = [row for row in rows if row["target"] == "gateway[bare] idle"]
    assert len(idle) == 1 and idle[0]["rss_mb"] > 10
