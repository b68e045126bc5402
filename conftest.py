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


# In CI (.ci/run sets LLMROUTER_REQUIRE_SERVICES=1) the PostgreSQL and Redis tests must run:
# a skip because a server is unreachable is turned into a failure there.
_SERVICE_WORDS = ("postgres", "redis")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and os.environ.get("LLMROUTER_REQUIRE_SERVICES") == "1"):
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr).lower()
    if any(word in reason for word in _SERVICE_WORDS) and ("unreachable" in reason or "not running" in reason
                                                           or "not available" in reason or "absent" in reason):
        report.outcome = "failed"
        report.longrepr = f"required service missing in CI: {reason}"
