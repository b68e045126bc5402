"""``llmrouter bench --litellm``: LiteLLM's proxy measured beside llmrouter.

The end-to-end test runs a stand-in for LiteLLM's ``litellm`` command: it reads the
command line and config the bench gives LiteLLM, checks them as LiteLLM would need
them, and serves the fake upstream on the given port behind the master key (a request
without it gets a 401, counted as an error). The test marked ``litellm`` runs the real
proxy, from ``scripts/setup-litellm-env``'s environment (``.ci/run`` has a stage).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmrouter.bench import litellm
from llmrouter.bench.compare import compare_with_litellm
from llmrouter.bench.gateway import GatewayRow, _compare_with_bare

STAND_IN = """\
#!{python}
import argparse, os, sys, yaml
parser = argparse.ArgumentParser()
for option in ("--config", "--host", "--port", "--num_workers", "--log_config"):
    parser.add_argument(option, required=True)
args = parser.parse_args()
config = yaml.safe_load(open(args.config))
[entry] = config["model_list"]
params = entry["litellm_params"]
assert entry["model_name"] == "mock-gpt" and params["model"] == "openai/mock-gpt", entry
assert params["api_base"].startswith("http://127.0.0.1:") and params["api_base"].endswith("/v1"), params
assert args.host == "127.0.0.1" and args.num_workers == "1", args
assert yaml.safe_load(open(args.log_config))["loggers"]["uvicorn.access"]["level"] == "WARNING"
assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"  # else it downloads at start
settings = config.get("litellm_settings", {{}})
with open(os.environ["STAND_IN_LOG"], "a") as log:
    log.write(",".join(sorted(settings)) + "\\n")
key = config["general_settings"]["master_key"]
os.execv(sys.executable, [sys.executable, "-m", "llmrouter.testing.upstream", "--port", args.port,
    "--api-key", key, "--model", "mock-gpt", "--chunks", "3", "--no-record"])
"""


def _stand_in(tmp_path: Path) -> Path:
    path = tmp_path / "litellm"
    path.write_text(STAND_IN.format(python=sys.executable))
    path.chmod(0o755)
    return path


def _bench(
    tmp_path: Path, command: str, modes: str, env: dict[str, str] | None = None, coalescing: int | None = None
) -> dict:
    out = tmp_path / "bench.json"
    burst = ["--coalescing", str(coalescing)] if coalescing else []
    run = subprocess.run(
        [sys.executable, "-m", "llmrouter.cli", "bench", "--concurrency", "2", "--rounds", "2",
         "--duration", "0.5", "--chunks", "3", "--modes", modes, "--litellm", command, "--json", str(out),
         *burst],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "llmrouter against LiteLLM (the same mode):" in run.stdout
    return json.loads(out.read_text())


def test_litellm_is_measured_in_the_modes_it_has_a_counterpart_of(tmp_path: Path) -> None:
    log = tmp_path / "started.log"
    results = _bench(tmp_path, str(_stand_in(tmp_path)), "bare,accounting,cache", {"STAND_IN_LOG": str(log)})
    # bare and cache; accounting has no counterpart (LiteLLM's ledger needs PostgreSQL).
    assert log.read_text().splitlines() == ["", "cache,cache_params"]
    measured = [row for row in results["gateway"] if row["concurrency"]]
    litellm_rows = [row for row in measured if row["target"].startswith("litellm[")]
    assert [(row["target"], row["stream"]) for row in litellm_rows] == [
        ("litellm[bare]", False),
        ("litellm[bare]", True),
        ("litellm[cache]", False),
        ("litellm[cache]", True),
    ]
    for row in litellm_rows:  # the master key went with every request: no 401
        assert row["errors"] == 0 and row["rps"] > 0 and row["cpu_ms_per_req"] > 0, row
    # litellm[cache]'s cost is against LiteLLM's own bare, round by round.
    bare = {row["stream"]: row["cpu_ms_rounds"] for row in litellm_rows[:2]}
    for row in litellm_rows[2:]:
        ratios = [cpu / base for cpu, base in zip(row["cpu_ms_rounds"], bare[row["stream"]], strict=True)]
        assert row["cpu_vs_bare"] == pytest.approx((ratios[0] + ratios[1]) / 2 - 1)
    assert [(c["mode"], c["stream"]) for c in results["litellm_comparison"]] == [
        ("bare", False),
        ("bare", True),
        ("cache", False),
        ("cache", True),
    ]
    ours = {(row["target"], row["stream"]): row for row in measured}
    for comparison in results["litellm_comparison"]:
        mode, stream = comparison["mode"], comparison["stream"]
        assert comparison["cpu_ms_per_req"] == ours[(f"gateway[{mode}]", stream)]["cpu_ms_per_req"]
        assert comparison["litellm_rps"] == ours[(f"litellm[{mode}]", stream)]["rps"]
        assert comparison["litellm_cpu_ratio"] > 0


def _row(target: str, rounds: list[float], stream: bool = False) -> GatewayRow:
    return GatewayRow(
        target, stream, 4, 100.0, 1.0, 1.0, 1.0, 1.0, 0.5, sum(rounds) / 2, 50.0, 0, cpu_ms_rounds=rounds
    )


def test_each_gateway_is_compared_with_its_own_bare() -> None:
    rows = [
        _row("gateway[bare]", [0.2, 0.4]),
        _row("gateway[cache]", [0.3, 0.5]),
        _row("litellm[bare]", [8.0, 10.0]),
        _row("litellm[cache]", [10.0, 10.0]),
    ]
    _compare_with_bare(rows)
    assert [row.cpu_vs_bare for row in rows] == [None, pytest.approx((1.5 + 1.25) / 2 - 1), None, 0.125]
    assert rows[3].cpu_ms_over_bare == pytest.approx(1.0)
    [bare, cache] = compare_with_litellm(rows)
    # LiteLLM's CPU over ours: the median of the rounds' ratios, not the ratio of medians.
    assert (bare.mode, bare.litellm_cpu_ratio) == ("bare", pytest.approx((40 + 25) / 2))
    assert (cache.mode, cache.litellm_cpu_ratio) == ("cache", pytest.approx((10 / 0.3 + 20) / 2))


def test_the_config_per_mode() -> None:
    config = litellm.litellm_config(8123, "full", "mock-gpt")
    assert config["model_list"][0]["litellm_params"]["api_base"] == "http://127.0.0.1:8123/v1"
    assert config["litellm_settings"] == {
        "cache": True,
        "cache_params": {"type": "local"},
        "callbacks": ["prometheus"],
    }
    assert "litellm_settings" not in litellm.litellm_config(8123, "bare", "mock-gpt")
    with pytest.raises(ValueError, match="no counterpart of bench mode 'accounting'"):
        litellm.litellm_config(8123, "accounting", "mock-gpt")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--modes", "accounting"], "--litellm: LiteLLM has no counterpart of --modes accounting"),
        (["--no-gateway", "--providers", "transformers"], "--litellm measures a gateway: drop --no-gateway"),
    ],
)
def test_the_command_refuses_before_measuring(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmrouter.cli import main

    assert main(["bench", "--litellm", sys.executable, *argv]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_a_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from llmrouter.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["bench", "--litellm", "/nonexistent/litellm"])
    assert exited.value.code == 2 and "argument --litellm: no executable" in capsys.readouterr().err


def test_a_proxy_that_does_not_start_shows_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "litellm"
    broken.write_text(
        "#!/bin/sh\necho 'ModuleNotFoundError: No module named prometheus_client' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"(?s)did not start in mode full.*prometheus_client"):
        litellm.start_litellm(str(broken), 9, tmp_path, "full", "mock-gpt")


LITELLM = os.environ.get("LLMROUTER_LITELLM")
if LITELLM is None and os.environ.get("LLMROUTER_REQUIRE_LITELLM") == "1":
    raise RuntimeError("LLMROUTER_REQUIRE_LITELLM=1 but LLMROUTER_LITELLM names no litellm command")


@pytest.mark.litellm
@pytest.mark.skipif(LITELLM is None, reason="LLMROUTER_LITELLM is not set (scripts/setup-litellm-env)")
def test_the_real_litellm_proxy(tmp_path: Path) -> None:
    assert LITELLM is not None
    results = _bench(tmp_path, LITELLM, "bare,full", coalescing=4)
    rows = [r for r in results["gateway"] if r["concurrency"] and r["target"].startswith("litellm[")]
    assert {(r["target"], r["stream"]) for r in rows} == {
        (f"litellm[{mode}]", stream) for mode in ("bare", "full") for stream in (False, True)
    }
    for row in rows:
        assert row["errors"] == 0 and row["rps"] > 0 and row["rss_mb"] > 10, row
    assert len(results["litellm_comparison"]) == 4
    # The burst reached LiteLLM and llmrouter alike; llmrouter made one upstream call of it.
    burst = {(row["target"], row["stream"]): row for row in results["coalescing"]}
    assert {target for target, _ in burst} == {"direct", "gateway[cache]", "litellm[cache]"}
    assert all(row["errors"] == 0 for row in burst.values())
    assert (
        burst[("gateway[cache]", False)]["upstream_calls"]
        == burst[("gateway[cache]", True)]["upstream_calls"]
        == 1
    )
