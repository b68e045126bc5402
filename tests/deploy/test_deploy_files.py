"""Static validation of the deployment files: compose, Prometheus, Grafana provisioning,
the compose stack's llmrouter configs, and the Containerfile's promises.

No container engine runs here; what can be checked without one is checked:
``docker-compose config`` (Debian's docker-compose 1.29, which validates against the
Compose specification schema it bundles) and ``promtool check config`` (Debian's
prometheus package). Each is skipped, saying so, when the tool is absent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llmrouter.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
CONTAINERFILE = ROOT / "Containerfile"
PROFILES = ("ollama", "vllm", "postgres", "redis")


def compose_data() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose not installed (apt-get install docker-compose)",
)
@pytest.mark.parametrize("profiles", [(), PROFILES])
def test_compose_file_is_valid(profiles: tuple[str, ...]) -> None:
    args = ["docker-compose", "--project-directory", str(ROOT), "-f", str(COMPOSE)]
    for profile in profiles:
        args += ["--profile", profile]
    result = subprocess.run([*args, "config", "-q"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    listed = subprocess.run(
        [*args, "config", "--services"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert {"llmrouter", "prometheus", "grafana"} <= set(listed.stdout.split())


def test_compose_stack_shape() -> None:
    services = compose_data()["services"]
    # The default stack has no profile; the optional services all do.
    for name in ("llmrouter", "prometheus", "grafana"):
        assert "profiles" not in services[name], name
    for name in PROFILES:
        assert services[name]["profiles"] == [name]
    router = services["llmrouter"]
    assert router["build"]["dockerfile"] == "Containerfile"
    assert any(str(port).endswith(":8000") for port in router["ports"])
    assert "/health" in " ".join(router["healthcheck"]["test"])
    # The bind mounts point at files that exist in the repository.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source


needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)


def _promtool(*args: str) -> None:
    result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_prometheus_config_is_valid() -> None:
    _promtool("check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml"))


@needs_promtool
def test_budget_alerts_fire_on_the_newest_view_of_a_budget() -> None:
    # alerts.test.yml: two workers reporting a budget's spend as each last read it.
    _promtool("test", "rules", str(ROOT / "deploy" / "prometheus" / "alerts.test.yml"))


def test_prometheus_scrapes_the_service() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "llmrouter"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["llmrouter:8000"], "the compose service name and port"


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "llmrouter.yaml").read_text())
    path = providers["providers"][0]["options"]["path"]
    grafana = compose_data()["services"]["grafana"]
    assert any(
        v.endswith(":" + path + ":ro") and v.startswith("./deploy/grafana/dashboards")
        for v in grafana["volumes"]
    )
    board = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "llmrouter.json").read_text())
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in (
        "requests per second",
        "p50 / p90 / p99",
        "first chunk",
        "tokens per second",
        "cost",
        "cache hit ratio",
        "errors",
        "fallbacks",
    ):
        assert topic in titles, topic
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


@pytest.mark.parametrize("name", ["llmrouter.yaml", "vllm.yaml"])
def test_compose_llmrouter_configs_load(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("LLMROUTER_DATABASE_URL", "LLMROUTER_CACHE_BACKEND", "VLLM_MODEL"):
        monkeypatch.delenv(variable, raising=False)
    config = load_config(ROOT / "deploy" / "llmrouter" / name)
    assert config.telemetry.json_logs
    assert config.accounting.database.url.startswith("sqlite+aiosqlite:////data/")
    monkeypatch.setenv("LLMROUTER_CACHE_BACKEND", "redis")
    assert load_config(ROOT / "deploy" / "llmrouter" / name).cache.backend == "redis"


def test_containerfile_promises() -> None:
    text = CONTAINERFILE.read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, re.M)
    assert stages == ["builder", "runtime"], "multi-stage: wheels built apart from the runtime"
    runtime = text.split("AS runtime", 1)[1]
    user = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert user and not user[-1].startswith(("0", "root")), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", runtime, re.M)
    assert re.search(r"^EXPOSE 8000$", runtime, re.M)
    assert '"--host", "0.0.0.0"' in runtime
    assert "ARG TORCH_VERSION=2.13.0" in text and "+cpu" in text, "CPU torch, pinned"
    for provider in ("remote", "ollama", "openrouter"):
        assert f"./providers/{provider}" in text
