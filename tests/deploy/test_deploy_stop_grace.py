"""``docker compose stop`` gives llmrouter time to shut down: SIGTERM, then SIGKILL after
the service's ``stop_grace_period`` (10 s by default, while the drain alone is 25 s)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from llmrouter.config import load_config
from llmrouter.server.app import shutdown_bound

ROOT = Path(__file__).resolve().parents[2]


def _seconds(duration: str) -> float:
    """A compose duration (``1m30s``, ``70s``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


@pytest.mark.parametrize("name", ["llmrouter.yaml", "vllm.yaml"])
def test_the_stop_grace_period_covers_the_whole_shutdown(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("LLMROUTER_DATABASE_URL", "LLMROUTER_CACHE_BACKEND", "VLLM_MODEL"):
        monkeypatch.delenv(variable, raising=False)
    service = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["llmrouter"]
    assert "stop_grace_period" in service, "compose's default 10 s kills the drain half-way"
    config = load_config(ROOT / "deploy" / "llmrouter" / name)
    drain = config.server.drain_seconds
    assert drain is not None
    # The drain, then the app's shutdown (settle, ledger flush, stores), which is bounded.
    assert _seconds(service["stop_grace_period"]) >= drain + shutdown_bound(config) + 5


def test_durations() -> None:
    assert _seconds("70s") == 70 and _seconds("1m30s") == 90
