"""What ``serve`` and ``models`` check beyond the schema, with the providers: the
``providers:`` section, the deployment ids the router uses, ``serve --model``'s path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from llmrouter import cli
from llmrouter.errors import ConfigError

REMOTE = {"provider": "remote", "model": "m", "base_url": "http://127.0.0.1:1/v1"}


def write(path: Path, **data: object) -> Path:
    path.write_text(yaml.safe_dump({"models": [{"name": "g", "deployments": [REMOTE]}], **data}))
    return path


@pytest.fixture(autouse=True)
def no_serving(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``serve`` that gets past its checks fails the test instead of listening (in the
    test's folder: the ledger and journal land in the working directory)."""

    def run(*args: object, **kwargs: object) -> None:
        raise AssertionError("serve started")

    monkeypatch.setattr("uvicorn.run", run)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMROUTER_TRANSFORMERS_MODEL", "")  # serve --model sets it: restored afterwards


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmrouter: error: ")
    return err


@pytest.mark.parametrize(
    ("providers", "expected"),
    [
        # Accepted before; every `ollama/...` or `openrouter/...` request then got 404.
        ({"openrouterr": {"api_key": "x"}}, "unknown provider 'openrouterr'"),
        ({"ollama": {"hots": "http://127.0.0.1:1"}}, "unknown field `hots` - at `$.providers.ollama`"),
        ({"remote": {"base_ur": "http://h/v1"}}, "unknown field `base_ur` - at `$.providers.remote`"),
        ({"ollama": {"connect_timeout": "soon"}}, "- at `$.providers.ollama.connect_timeout`"),
        ({"remote": {"read_timeout": -3}}, "- at `$.providers.remote.read_timeout`"),
        ({"openrouter": {"base_url": "not a url"}}, "- at `$.providers.openrouter.base_url`"),
    ],
)
@pytest.mark.parametrize("command", [["models"], ["serve", "--port", "1"]])
def test_a_bad_providers_entry_is_a_one_line_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], providers: dict, expected: str, command: list[str]
) -> None:
    config = write(tmp_path / "c.yaml", providers=providers)
    err = one_line_error([*command, "--config", str(config)], capsys)
    assert expected in err and f"config: {config}: " in err
    name = next(iter(providers))
    assert f"$.providers.{name}" in err


def test_providers_defaults_without_a_required_option_are_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # base_url is required of a remote deployment; its defaults need not give it.
    config = write(
        tmp_path / "c.yaml", providers={"remote": {"api_key": "${KEY:-sk}", "max_connections": "8"}}
    )
    assert cli.main(["models", "--config", str(config)]) == 0


def test_models_names_a_remote_deployment_without_an_http_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It passed `models`; `serve` started, and the deployment failed to (503s).
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump({"models": [{"name": "g", "deployments": [{**REMOTE, "base_url": "not a url"}]}]})
    )
    err = one_line_error(["models", "--config", str(config)], capsys)
    assert "models[g].deployments[0]" in err and "`$.base_url`" in err


def test_models_shows_the_deployment_ids_the_router_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    second = {**REMOTE, "base_url": "http://127.0.0.1:2/v1"}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "g", "deployments": [REMOTE, second]}]}))
    assert cli.main(["models", "--config", str(config)]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert [row.split()[-3] for row in rows] == ["remote/m", "remote/m#2"]


def test_models_refuses_a_deployment_id_given_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    groups = [{"name": name, "deployments": [{**REMOTE, "id": "gpu-1"}]} for name in ("a", "b")]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": groups}))
    err = one_line_error(["models", "--config", str(config)], capsys)
    assert "'gpu-1' is used twice" in err and "`$.models[1].deployments[0].id`" in err


@pytest.mark.parametrize("model", ["/nonexistent/dir", "./no-such-model", "~/no-such-model-dir"])
def test_serve_refuses_a_model_path_that_does_not_exist(
    model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # It started; the deployment then failed to load, and its requests got 503.
    err = one_line_error(["serve", "--model", model, "--port", "1"], capsys)
    assert f"serve --model: {model} does not exist" in err


def test_a_model_that_is_a_hub_id_or_an_existing_folder_is_not_refused(tmp_path: Path) -> None:
    cli._check_model_path("HuggingFaceTB/SmolLM2-135M-Instruct", "serve --model")
    cli._check_model_path(str(tmp_path), "serve --model")
    with pytest.raises(ConfigError, match=f"^{cli.MODEL_ENV}: ./missing does not exist"):
        cli._check_model_path("./missing", cli.MODEL_ENV)


def test_serve_workers_from_the_flag_reach_the_workers_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--workers 2`` left ``server.workers`` at 1 in the config each worker builds from:
    accounting's ``auto`` budget store kept budgets in each worker's memory (a key spent
    up to twice its budget), where several workers must share them in the database."""
    import msgspec

    from llmrouter.accounting import Accounting
    from llmrouter.config import Config
    from llmrouter.server.app import RESOLVED_CONFIG_ENV

    served: list[int] = []
    monkeypatch.setattr(cli, "_serve_workers", lambda workers, common: served.append(workers) or 0)
    monkeypatch.delenv(RESOLVED_CONFIG_ENV, raising=False)
    config = write(tmp_path / "c.yaml", accounting={"enabled": True})
    assert cli.main(["serve", "--config", str(config), "--workers", "2"]) == 0
    handed = msgspec.json.decode(os.environ.pop(RESOLVED_CONFIG_ENV), type=Config)
    assert served == [2] and handed.server.workers == 2
    assert Accounting.from_config(handed).config.budget_backend == "database"
