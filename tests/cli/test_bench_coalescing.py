"""``llmrouter bench --coalescing``: a burst of identical requests, and the upstream calls it makes."""

import json
import subprocess
import sys
from pathlib import Path


def test_a_burst_of_identical_requests_is_one_upstream_call_through_llmrouter(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "llmrouter.cli", "bench", "--no-gateway", "--coalescing", "8", "--chunks", "3",
         "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "8 identical requests at once, the upstream answering after 200 ms:" in run.stdout
    rows = json.loads(out.read_text())["coalescing"]
    calls = {(row["target"], row["stream"]): row["upstream_calls"] for row in rows}
    # Straight at the upstream, each request is a call; through llmrouter's cache, one.
    assert calls == {
        ("direct", False): 8,
        ("direct", True): 8,
        ("gateway[cache]", False): 1,
        ("gateway[cache]", True): 1,
    }
    for row in rows:
        # Every request waited for the one call: about the upstream's 200 ms, not 8 x.
        assert row["errors"] == 0 and 190 < row["p50_ms"] <= row["max_ms"] < 2000, row
