"""``llmrouter models`` / ``chat``, config search and plugin sub-commands (in-process ``main``)."""

from __future__ import annotations

import io
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import openai
import pytest

from llmrouter import cli
from llmrouter.errors import ConfigError
from llmrouter.testing.upstream import FakeUpstream


def test_models_table(
    tmp_path: Path, fake: FakeUpstream, make_config: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(tmp_path / "c.yaml", fake.base_url)
    assert cli.main(["models", "--config", str(config)]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["MODEL", "ALIASES", "STRATEGY", "DEPLOYMENT", "PROVIDER", "UPSTREAM", "MODEL"]
    assert row.split() == ["mock-gpt", "priority", "remote/mock-gpt", "remote", "mock-gpt"]


@pytest.mark.parametrize("stream", [True, False])
def test_chat_one_shot_in_process(
    tmp_path: Path, fake: FakeUpstream, make_config: Any, capsys: pytest.CaptureFixture[str], stream: bool
) -> None:
    config = make_config(tmp_path / "c.yaml", fake.base_url)
    argv = ["chat", "-m", "mock-gpt", "hello", "--config", str(config), "--max-tokens", "5"]
    assert cli.main(argv if stream else [*argv, "--no-stream"]) == 0
    assert capsys.readouterr().out == "Echo: hello\n"
    assert fake.last_request.json["max_tokens"] == 5
    assert fake.last_request.json.get("stream", False) is stream


def test_chat_error_is_one_line_and_exit_1(
    tmp_path: Path, fake: FakeUpstream, make_config: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(tmp_path / "c.yaml", fake.base_url)
    assert cli.main(["chat", "-m", "nope", "hi", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmrouter: error: The model `nope` does not exist") and "Traceback" not in err


def test_chat_over_http_without_a_model_errs_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # Without -m the first listed model is asked for: that listing's errors were tracebacks.
    from .conftest import free_port

    assert cli.main(["chat", "--url", f"http://127.0.0.1:{free_port()}", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmrouter: error: cannot reach http://127.0.0.1:") and "Traceback" not in err


def test_chat_over_http_without_the_openai_package_errs_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # what `import openai` finds uninstalled
    assert cli.main(["chat", "--url", "http://127.0.0.1:1/v1", "hi"]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == "llmrouter: error: `chat --url` talks to the server with the openai package: pip install openai\n"
    )


def test_chat_repl_keeps_history(
    tmp_path: Path,
    fake: FakeUpstream,
    make_config: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_config(tmp_path / "c.yaml", fake.base_url)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\n\nsecond\n/exit\n"))
    assert (
        cli.main(["chat", "--config", str(config), "--system", "be brief"]) == 0
    )  # default model: the only one
    out = capsys.readouterr().out
    assert "Echo: first" in out and "Echo: second" in out
    messages = fake.generation_requests()[-1].json["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == "Echo: first"


def test_chat_over_http_with_the_openai_client(
    tmp_path: Path,
    fake: FakeUpstream,
    make_config: Any,
    serve: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_config(tmp_path / "c.yaml", fake.base_url)
    clients: list[openai.AsyncOpenAI] = []

    class Recorded(openai.AsyncOpenAI):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            clients.append(self)

    monkeypatch.setattr(openai, "AsyncOpenAI", Recorded)
    with serve(config) as server:
        assert cli.main(["chat", "--url", server.url, "hello"]) == 0
        assert capsys.readouterr().out == "Echo: hello\n"
        assert cli.main(["chat", "--url", f"{server.url}/v1", "-m", "missing", "hello"]) == 1
        assert "404" in capsys.readouterr().err
    # Closed by the command, not left to the garbage collector, which would close them
    # in some later event loop (a later test's, where their sockets fail to close).
    assert len(clients) == 2 and all(client.is_closed() for client in clients)


def test_chat_prints_only_the_answer(
    tmp_path: Path, fake: FakeUpstream, make_config: Any, serve: Any
) -> None:
    # The installed command, which sets up logging itself (in process, pytest's handlers
    # are there first): the SDK's HTTP client logged each request at INFO on stderr.
    config = make_config(tmp_path / "c.yaml", fake.base_url)
    command = [str(Path(sys.executable).with_name("llmrouter")), "chat", "hello"]
    with serve(config) as server:
        done = subprocess.run([*command, "--url", server.url], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "Echo: hello\n", "")


def test_config_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.CONFIG_ENV, raising=False)
    assert cli.find_config_path() is None
    (tmp_path / "llmrouter.yaml").write_text("models: []\n")
    assert cli.find_config_path() == Path("llmrouter.yaml")
    monkeypatch.setenv(cli.CONFIG_ENV, "/etc/other.yaml")
    assert cli.find_config_path() == Path("/etc/other.yaml")
    assert cli.find_config_path("given.yaml") == Path("given.yaml")


def test_bad_config_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: x\n    deployments: []\n")
    assert cli.main(["models", "--config", str(bad)]) == 1
    assert "has no deployments" in capsys.readouterr().err


def test_serve_or_models_with_an_unknown_provider_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was a traceback from the app's start-up, logged by uvicorn, and exit status 3.
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: x\n    deployments:\n      - {provider: nosuch, model: m}\n")
    for command in (["serve", "--port", "1"], ["models"]):
        assert cli.main([*command, "--config", str(bad)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "unknown provider 'nosuch'" in err
        assert "$.models[0].deployments[0].provider" in err


def test_serve_or_models_with_an_option_its_provider_does_not_take_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `models` passed it (exit 0); `serve` failed in its start-up, exit 3.
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "models:\n  - name: x\n    deployments:\n      - {provider: remote, model: m, base_ur: http://h/v1}\n"
    )
    for command in (["serve", "--port", "1"], ["models"]):
        assert cli.main([*command, "--config", str(bad)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "unknown field `base_ur`" in err and "models[x].deployments[0]" in err


def test_plugin_subcommands_are_registered(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin = types.ModuleType("llmrouter.bench.cli")

    def register(subparsers: Any) -> None:
        parser = subparsers.add_parser("bench", help="benchmarks")
        parser.set_defaults(func=lambda args: print("bench ran") or 0)

    plugin.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llmrouter.bench.cli", plugin)
    assert cli.main(["bench"]) == 0
    assert capsys.readouterr().out == "bench ran\n"


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "serve" in capsys.readouterr().out


@pytest.mark.parametrize(("option", "value"), [("--port", "99999"), ("--port", "http"), ("--workers", "-1")])
def test_serve_refuses_a_port_or_worker_count_out_of_range(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", option, value])
    assert info.value.code == 2
    assert f"argument {option}: expected a whole number from" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "3", "warm"])
def test_chat_refuses_a_temperature_no_request_can_carry(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # nan and inf went through to the openai client, whose JSON encoder raised a traceback.
    with pytest.raises(SystemExit) as info:
        cli.main(["chat", "--url", "http://127.0.0.1:1/v1", "--temperature", value, "hi"])
    assert info.value.code == 2
    assert "argument --temperature/-t: expected a number from 0 to 2" in capsys.readouterr().err


def test_serve_model_is_added_to_a_config_that_has_models(tmp_path: Path) -> None:
    # Before: only discovery read it, and discovery does not run for a config with models.
    from llmrouter.config import parse_config

    config = parse_config(
        {
            "models": [
                {
                    "name": "m",
                    "deployments": [{"provider": "remote", "model": "m", "base_url": "http://x/v1"}],
                }
            ]
        }
    )
    folder = tmp_path / "my-model"
    folder.mkdir()
    served = cli._with_model(config, str(folder))
    assert [g.name for g in served.models] == ["m", "my-model"]
    assert served.models[1].deployments[0].options == {"path": str(folder)}
    with pytest.raises(ConfigError, match="already has a model named 'm'"):
        cli._with_model(config, "m")
