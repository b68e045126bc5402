"""A completion request the service's authentication refuses (401) counts as a
rejection, ``unauthorized``, with its operation duration, though it never reaches the
router; hooks that did not ask for such requests (accounting's ledger) are not told.

Before: the service authenticated before the router, and the documented
``llmrouter_requests_rejected_total{reason="unauthorized"}`` stayed at 0."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from litestar.testing import TestClient

from llmrouter.context import RequestContext
from llmrouter.errors import AuthenticationError, LLMRouterError
from llmrouter.extension import Extension
from llmrouter.hooks import RouterHooks
from llmrouter.router import Router
from llmrouter.server import create_app
from llmrouter.telemetry import JsonFormatter, TelemetryConfig
from llmrouter.telemetry.extension import TelemetryExtension
from llmrouter.testing.scripted import ScriptedProvider, Step

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
KEY = {"Authorization": "Bearer good"}


class KeyCheck(Extension):
    """Authentication as accounting's: 401 without the right key."""

    name = "key-check"

    async def authenticate(self, ctx: RequestContext, headers: Mapping[str, str]) -> None:
        if headers.get("authorization") != KEY["Authorization"]:
            raise AuthenticationError("missing API key", code="missing_api_key")


class Ledger(RouterHooks):
    """Writes a row for every refusal it hears of, as accounting's hooks do."""

    def __init__(self) -> None:
        self.rows: list[str] = []

    def on_rejected(self, ctx: RequestContext, error: LLMRouterError) -> None:
        self.rows.append(type(error).__name__)


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def client(ledger: Ledger) -> Iterator[TestClient[Any]]:
    router = Router(hooks=[ledger])
    router.add_deployment("m", ScriptedProvider("upstream-m", default=Step(text="hello")))
    telemetry = TelemetryExtension(TelemetryConfig(json_logs=False))
    with TestClient(create_app(router=router, extensions=[KeyCheck(), telemetry])) as test_client:
        yield test_client


def metric_value(text: str, name: str, **labels: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(f'{key}="{value}"' in line for key, value in labels.items())
    )


def test_a_refused_key_counts_as_an_unauthorized_rejection(client: TestClient[Any], ledger: Ledger) -> None:
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
    assert client.post("/completions", json={"model": "m", "prompt": "hi"}).status_code == 401
    assert client.post("/v1/chat/completions", json=CHAT, headers=KEY).status_code == 200
    scrape = client.get("/metrics").text
    rejected = "llmrouter_requests_rejected_total"
    assert metric_value(scrape, rejected, llmrouter_rejection_reason="unauthorized") == 2
    assert metric_value(scrape, rejected, gen_ai_request_model="unknown") == 2  # no body read: no model
    duration = "gen_ai_client_operation_duration_seconds_count"
    for operation in ("chat", "text_completion"):
        assert (
            metric_value(scrape, duration, gen_ai_operation_name=operation, error_type="AuthenticationError")
            == 1
        )
    # Only the telemetry hooks heard of them: an anonymous flood must not fill the ledger.
    assert ledger.rows == []


def test_a_refused_key_elsewhere_than_a_completion_is_no_rejection(client: TestClient[Any]) -> None:
    assert client.get("/v1/models").status_code == 401
    scrape = client.get("/metrics").text
    assert metric_value(scrape, "llmrouter_requests_rejected_total") == 0


def test_the_access_line_of_a_refused_key_says_why(
    client: TestClient[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmrouter.access")
    response = client.post("/v1/chat/completions", json=CHAT)
    (record,) = [r for r in caplog.records if r.name == "llmrouter.access"]
    line = json.loads(JsonFormatter().format(record))
    assert line["status"] == 401 and line["request_id"] == response.headers["x-request-id"]
    assert line["error"] == {"type": "AuthenticationError", "code": "missing_api_key"}


def test_only_telemetry_counts_requests_without_a_valid_key() -> None:
    # Accounting's on_rejected writes a ledger row: it must not hear of them.
    from llmrouter.accounting.hooks import AccountingHooks
    from llmrouter.telemetry import TelemetryHooks

    assert TelemetryHooks.counts_unauthenticated
    assert not getattr(AccountingHooks, "counts_unauthenticated", False)
