"""The request span names the provider that answered, and the request line reads well
in plain text as well as in JSON."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import anyio
import pytest
from litestar.testing import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmrouter import Router
from llmrouter.context import RequestContext
from llmrouter.server import create_app
from llmrouter.telemetry import JsonFormatter, TelemetryConfig, TelemetryHooks
from llmrouter.telemetry.extension import TelemetryExtension
from llmrouter.testing.scripted import ScriptedProvider, Step

BODY = {"model": "g", "messages": [{"role": "user", "content": "hi"}]}
PLAIN = logging.Formatter("%(message)s")  # what telemetry.json_logs: false prints


def test_the_request_span_names_the_provider_that_answered() -> None:
    # Before: always "unknown", the value at its start, before any deployment answered.
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    router = Router(hooks=[TelemetryHooks(tracer_provider=tracer_provider, log_requests=False)])
    router.add_deployment("g", ScriptedProvider(default=Step(text="hello")))
    anyio.run(router.chat, BODY)
    (request_span,) = [span for span in exporter.get_finished_spans() if span.name == "chat g"]
    assert request_span.attributes is not None
    assert request_span.attributes["gen_ai.provider.name"] == "scripted"


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "llmrouter.access"]


def test_the_plain_access_line_is_readable_and_the_json_one_unchanged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: with json_logs off the line was the bare word "request".
    caplog.set_level(logging.INFO, logger="llmrouter.access")
    router = Router()
    router.add_deployment("g", ScriptedProvider(default=Step(text="hello")))
    extension = TelemetryExtension(TelemetryConfig(json_logs=False, metrics=False))
    with TestClient(create_app(router=router, extensions=[extension])) as client:
        response = client.post("/v1/chat/completions", json=BODY)
        refused = client.post("/v1/chat/completions", content=b"{not json")  # never reaches the router
    record, unrouted = access_records(caplog)
    assert re.fullmatch(
        r"request POST /v1/chat/completions 400 \d+(\.\d+)? ms request_id="
        + re.escape(refused.headers["x-request-id"]),
        PLAIN.format(unrouted),
    )
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(
        rf"request POST /v1/chat/completions 200 \d+(\.\d+)? ms model=g request_id={re.escape(request_id)}",
        PLAIN.format(record),
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "request" and not [key for key in line if key.startswith("_")]
    assert (line["method"], line["status"], line["model"], line["request_id"]) == (
        "POST",
        200,
        "g",
        request_id,
    )


def test_the_plain_library_line_is_readable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llmrouter.access")
    router = Router(hooks=[TelemetryHooks()])
    router.add_deployment("g", ScriptedProvider(default=Step(text="hello")))
    ctx = RequestContext()

    async def ask() -> Any:
        return await router.chat(BODY, context=ctx)

    anyio.run(ask)
    (record,) = access_records(caplog)
    assert re.fullmatch(
        rf"request chat ok \d+(\.\d+)? ms model=g request_id={re.escape(ctx.request_id)}",
        PLAIN.format(record),
    )
    assert json.loads(JsonFormatter().format(record))["message"] == "request"


@pytest.mark.anyio
async def test_the_log_level_holds_for_plain_lines_too() -> None:
    """``telemetry.log_level`` was applied only with ``json_logs``: plain lines stayed at INFO."""
    llmrouter_logger = logging.getLogger("llmrouter")
    before = llmrouter_logger.level, logging.getLogger().level
    llmrouter_logger.setLevel(logging.INFO)  # what the CLI's plain set-up leaves
    extension = TelemetryExtension(TelemetryConfig(json_logs=False, metrics=False, log_level="ERROR"))
    await extension.startup()
    try:
        assert not llmrouter_logger.isEnabledFor(logging.INFO)
        assert llmrouter_logger.isEnabledFor(logging.ERROR)
    finally:
        await extension.shutdown()
        llmrouter_logger.setLevel(before[0])
        logging.getLogger().setLevel(before[1])
