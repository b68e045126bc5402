"""The README's examples run as written, against a real service and a fake upstream.

Only addresses are rewritten: the fake upstream and the service listen on free ports
instead of 18000 and 8000, and the service serves the README's model names.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llmrouter.config import parse_config
from llmrouter.server import create_app
from llmrouter.testing.serve import serve_app
from llmrouter.testing.upstream import FakeUpstream

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def upstream():
    with FakeUpstream(
        models=["mock-gpt", "smollm2-135m-instruct"], reply="Paris. You said: {last_user}", chunks=3
    ) as up:
        yield up


@pytest.fixture(scope="module")
def service(upstream, tmp_path_factory):
    deployment = {"provider": "remote", "base_url": upstream.base_url}
    config = parse_config(
        {
            "discover": False,
            "models": [
                {
                    "name": "smollm2-135m-instruct",
                    "deployments": [{**deployment, "model": "smollm2-135m-instruct"}],
                },
                {"name": "mock-gpt", "deployments": [{**deployment, "model": "mock-gpt"}]},
            ],
            "accounting": {"enabled": False},
        },
        env={},
    )
    with serve_app(create_app(config)) as url:
        yield url


def rewrite(code: str, upstream: FakeUpstream, service: str) -> str:
    return code.replace("http://127.0.0.1:18000/v1", upstream.base_url).replace(
        "http://127.0.0.1:8000", service
    )


def test_python_examples_run(upstream, service, capsys):
    examples = blocks("python")
    assert len(examples) >= 2
    for code in examples:
        exec(compile(rewrite(code, upstream, service), "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "Paris" in out
    assert "remote/mock-gpt" in out, "the library example prints the deployment that answered"


def test_curl_example_runs(upstream, service):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    curl = next(code for code in blocks("bash") if code.lstrip().startswith("curl"))
    result = subprocess.run(
        ["bash", "-c", rewrite(curl, upstream, service)], capture_output=True, text=True, check=True
    )
    assert '"object":"chat.completion"' in result.stdout.replace(" ", "") and "Paris" in result.stdout


def test_yaml_example_is_a_working_config(upstream):
    data = yaml.safe_load(rewrite(blocks("yaml")[0], upstream, ""))
    config = parse_config(data, env={})
    assert config.models[0].deployments[0].options["base_url"] == upstream.base_url
