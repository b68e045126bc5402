"""Shared pytest set-up for tests/ and providers/*/tests."""

import os

import pytest

# No test may reach a model hub: fail fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


# In CI (.ci/run sets LLMROUTER_REQUIRE_SERVICES=1) the tests marked `postgres` or `redis`
# must run: a skip of one of them (server unreachable) is turned into a failure there.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and os.environ.get("LLMROUTER_REQUIRE_SERVICES") == "1"):
        return
    if item.get_closest_marker("postgres") or item.get_closest_marker("redis"):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: skipped, but CI requires PostgreSQL and Redis: {report.longrepr}"
