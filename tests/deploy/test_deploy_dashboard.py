"""The Grafana dashboard queries metrics the service really exports.

The service runs in-process (Litestar's TestClient) over the remote provider and the
fake OpenAI upstream, with the telemetry and cache extensions; traffic covers a chat, a
stream, a cache hit, an upstream failure with retry, cooldown and fallback, and a
rejected request. Then ``/metrics`` is scraped and every metric and label that a panel
(or the template variable) uses must be in the scrape; the PromQL itself is checked
with ``promtool check rules`` when promtool is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from litestar.testing import TestClient

from llmrouter.config import parse_config
from llmrouter.server import create_app
from llmrouter.telemetry.config import TelemetryConfig
from llmrouter.telemetry.extension import TelemetryExtension
from llmrouter.testing.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "llmrouter.json"

PROMQL_WORDS = frozenset(
    {
        "sum", "avg", "min", "max", "count", "by", "without", "on", "ignoring", "group_left",
        "group_right", "and", "or", "unless", "bool", "offset", "rate", "irate", "increase",
        "histogram_quantile", "label_values", "topk", "bottomk", "clamp_min", "clamp_max", "abs",
        "le", "inf", "nan",
    }
)  # fmt: skip
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "1m", "$model": ".*"}


def dashboard_queries() -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and query variables."""
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable.get("type") == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    assert queries, "the dashboard has no queries"
    return queries


def with_variables(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a label_values() variable query)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    label_values = re.match(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,", expr)
    if label_values:
        return {label_values.group(1)}
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr):
        if match.group(1).lower() not in PROMQL_WORDS:
            names.add(match.group(1))
    return names


def label_names(expr: str) -> set[str]:
    """Label names in matchers and by()/without() clauses."""
    labels: set[str] = set()
    for block in re.findall(r"\{([^}]*)\}", expr):
        labels.update(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", block))
    for block in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels.update(name.strip() for name in block.split(",") if name.strip())
    label_values = re.match(r"\s*label_values\([^,]+,\s*(\w+)\s*\)", expr)
    if label_values:
        labels.add(label_values.group(1))
    return labels - {"le", "job"}


def scrape_series(text: str) -> dict[str, set[str]]:
    """Sample name -> the label names seen on it."""
    series: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s", line)
        assert match, line
        labels = set(re.findall(r'(\w+)="', match.group(2) or ""))
        series.setdefault(match.group(1), set()).update(labels)
    return series


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(
        models=["good-model", "broken-model"],
        reply="Echo: {last_user}",
        chunks=4,
        model_behaviours={"broken-model": "server_error"},
    ) as fake:
        yield fake


def service_config(base_url: str, folder: Path) -> Any:
    return parse_config(
        {
            "models": [
                {
                    "name": "chat-model",
                    "deployments": [
                        {
                            "provider": "remote",
                            "model": "good-model",
                            "base_url": base_url,
                            "id": "fake-good",
                            "price": {"input": 1.0, "output": 2.0},
                        },
                    ],
                },
                {
                    "name": "flaky-model",
                    "fallbacks": ["chat-model"],
                    "retry": {"attempts": 1, "backoff_base": 0.001, "backoff_max": 0.002},
                    "cooldown": {"failures": 2, "seconds": 60},
                    "deployments": [
                        {
                            "provider": "remote",
                            "model": "broken-model",
                            "base_url": base_url,
                            "id": "fake-broken",
                        },
                    ],
                },
            ],
            "discover": False,
            "accounting": {
                "database": {"url": f"sqlite:///{folder / 'acct.db'}"},
                "ledger": {"journal_dir": str(folder / "journal")},
                "budgets": [{"key": "*", "period": "month", "limit": 100.0}],
            },
            "cache": {"backend": "memory"},
        },
        env={},
    )


@pytest.fixture(scope="module")
def scrape(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> str:
    config = service_config(upstream.base_url, tmp_path_factory.mktemp("dashboard"))
    from llmrouter.accounting import extension_from_config as accounting_extension

    extensions: list[Any] = [accounting_extension(config)]
    try:
        from llmrouter.cache import extension_from_config as cache_extension
    except ImportError:  # the cache subsystem is optional
        cache_extension = None
    if cache_extension is not None and (cache := cache_extension(config)) is not None:
        extensions.append(cache)
    extensions.append(TelemetryExtension(TelemetryConfig(json_logs=False)))
    chat = {"model": "chat-model", "temperature": 0, "messages": [{"role": "user", "content": "ping"}]}
    with TestClient(create_app(config, extensions=extensions)) as client:
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        assert client.post("/v1/chat/completions", json=chat).status_code == 200  # cache hit
        stream = {**chat, "stream": True, "temperature": 0.7}
        with client.stream("POST", "/v1/chat/completions", json=stream) as response:
            assert response.status_code == 200 and "[DONE]" in response.read().decode()
        flaky = {**chat, "model": "flaky-model", "temperature": 0.5}
        assert client.post("/v1/chat/completions", json=flaky).status_code == 200  # retry, cooldown, fallback
        assert client.post("/v1/chat/completions", json={**chat, "model": "no-such-model"}).status_code == 404
        response = client.get("/metrics")
        assert response.status_code == 200
        return response.text


def test_every_dashboard_metric_and_label_is_exported(scrape: str) -> None:
    series = scrape_series(scrape)
    missing: list[str] = []
    for expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        labels_here: set[str] = set()
        for name in names:
            if name not in series:
                missing.append(f"{name} (in {expr})")
            labels_here |= series.get(name, set())
        for label in label_names(expr) - labels_here:
            missing.append(f"label {label} (in {expr})")
    assert not missing, "dashboard queries what /metrics does not export:\n" + "\n".join(missing)


def test_the_traffic_reached_the_interesting_series(scrape: str) -> None:
    series = scrape_series(scrape)
    assert "llmrouter_cache_requests_total" in series, "the cache layer did not report"
    for name in (
        "llmrouter_fallbacks_total",
        "llmrouter_retries_total",
        "llmrouter_deployment_cooldowns_total",
        "llmrouter_requests_rejected_total",
        "llmrouter_cost_total",
        "llmrouter_budget_spent",
        "llmrouter_budget_limit",
        "llmrouter_ledger_pending",
        "llmrouter_accounting_settlements_waiting",
    ):
        assert name in series, name
    assert 'llmrouter_cache_status="hit"' in scrape
    assert (
        re.search(r'gen_ai_client_operation_duration_seconds_count\{[^}]*error_type="UpstreamError"', scrape)
        is None
    ), "the flaky request recovered through the fallback: no failed operation"
    assert re.search(r'llmrouter_deployment_attempts_total\{[^}]*error_type="UpstreamError"', scrape)


def test_metric_name_extraction() -> None:
    expr = 'histogram_quantile(0.9, sum by (le, gen_ai_request_model) (rate(foo_bucket{a=~"x|y"}[5m]))) / bar_total'
    assert metric_names(expr) == {"foo_bucket", "bar_total"}
    assert label_names(expr) == {"gen_ai_request_model", "a"}
    assert metric_names("label_values(up_count, model)") == {"up_count"}


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    rules = [
        {"record": f"llmrouter:dashboard_query_{i}", "expr": with_variables(expr)}
        for i, expr in enumerate(dashboard_queries())
        if not expr.startswith("label_values(")
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
