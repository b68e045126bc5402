"""W3C traceparent handling, spans for the request and the provider calls, OTLP export,
and the JSON log formatter."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmrouter import Router
from llmrouter.config import Config as RouterConfigRoot
from llmrouter.config import Deployment, Retry, RouterConfig
from llmrouter.context import RequestContext, current_context
from llmrouter.errors import ConfigError, UpstreamError
from llmrouter.telemetry import JsonFormatter, TelemetryConfig, TelemetryHooks, configure_logging
from llmrouter.telemetry.tracing import (
    build_tracer_provider,
    new_traceparent,
    otlp_endpoint,
    parse_traceparent,
    trace_id_of,
)
from llmrouter.testing.scripted import ScriptedProvider, Step

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (VALID, True),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", True),  # not sampled, still valid
        (
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
            True,
        ),  # later version, extra field
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", False),  # version 00 has 4 fields
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", False),  # uppercase is invalid
        ("00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01", False),
        ("", False),
        (None, False),
    ],
)
def test_parse_traceparent(header: str | None, ok: bool) -> None:
    assert (parse_traceparent(header) is not None) is ok


def test_new_and_child_traceparents() -> None:
    parent = new_traceparent()
    assert parse_traceparent(parent.header()) == parent and parent.sampled
    child = parent.child()
    assert child.trace_id == parent.trace_id and child.span_id != parent.span_id
    assert trace_id_of(VALID) == "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def spans() -> tuple[InMemorySpanExporter, TracerProvider]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, provider


class RecordingProvider(ScriptedProvider):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.traceparents: list[str | None] = []

    async def chat(self, request: Any) -> Any:
        ctx = current_context.get()
        self.traceparents.append(ctx.traceparent if ctx else None)
        return await super().chat(request)


@pytest.mark.anyio
async def test_request_and_provider_call_spans(spans: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    exporter, provider = spans
    hooks = TelemetryHooks(tracer_provider=provider, log_requests=False)
    router = Router(
        RouterConfigRoot(router=RouterConfig(retry=Retry(attempts=1, backoff_base=0.001))), hooks=[hooks]
    )
    upstream = RecordingProvider(
        "up-model", steps=[Step(error=UpstreamError("flaky"))], default=Step(text="a b")
    )
    router.add_deployment("g", upstream, Deployment(provider="scripted", model="up-model", id="d0"))
    hooks.watch_router(router)
    ctx = RequestContext(traceparent=VALID)
    await router.chat({"model": "g", "messages": [{"role": "user", "content": "hi"}]}, context=ctx)

    finished = {span.name: span for span in exporter.get_finished_spans()}
    request_span = finished["chat g"]
    assert format(request_span.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert format(request_span.parent.span_id, "016x") == "00f067aa0ba902b7", "child of the caller's span"
    assert request_span.attributes["gen_ai.usage.output_tokens"] == 2
    calls = [s for s in exporter.get_finished_spans() if s.name == "chat d0"]
    assert len(calls) == 2, "one CLIENT span per attempt"
    assert all(c.parent.span_id == request_span.context.span_id for c in calls)
    assert [c.status.is_ok for c in calls] == [False, True]
    assert calls[0].attributes["error.type"] == "UpstreamError"
    assert calls[1].attributes["gen_ai.request.model"] == "up-model"
    assert calls[1].attributes["gen_ai.provider.name"] == "scripted"
    # The upstream is told about the router's span, within the caller's trace.
    sent = parse_traceparent(upstream.traceparents[-1])
    assert sent is not None and sent.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert sent.span_id == format(request_span.context.span_id, "016x")


@pytest.mark.anyio
async def test_without_tracing_a_trace_id_is_still_made() -> None:
    hooks = TelemetryHooks(log_requests=False)
    router = Router(hooks=[hooks])
    upstream = RecordingProvider(default=Step(text="x"))
    router.add_deployment("g", upstream)
    await router.chat({"model": "g", "messages": [{"role": "user", "content": "hi"}]})
    assert parse_traceparent(upstream.traceparents[0]) is not None


class OtlpCollector(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((self.path, self.headers.get("content-type", ""), body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), OtlpCollector)
    OtlpCollector.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


@pytest.mark.anyio
async def test_otlp_export_to_a_collector(collector: str) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the otlp extra is not installed")
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    provider = build_tracer_provider(
        TelemetryConfig(otlp_endpoint=f"{collector}/v1/traces", service_name="svc-x")
    )
    assert provider is not None
    router = Router(hooks=[TelemetryHooks(tracer_provider=provider, log_requests=False)])
    router.add_deployment("g", ScriptedProvider(default=Step(text="y")))
    await router.chat({"model": "g", "messages": [{"role": "user", "content": "hi"}]})
    provider.shutdown()  # flushes the batch
    assert OtlpCollector.received, "nothing was exported"
    path, content_type, body = OtlpCollector.received[0]
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    export = ExportTraceServiceRequest.FromString(body)
    names = {span.name for rs in export.resource_spans for ss in rs.scope_spans for span in ss.spans}
    assert {"chat g", "chat scripted/scripted-model"} <= names
    resource = {a.key: a.value.string_value for a in export.resource_spans[0].resource.attributes}
    assert resource["service.name"] == "svc-x"


def test_otlp_endpoint_from_standard_variables() -> None:
    config = TelemetryConfig()
    assert otlp_endpoint(config, {}) is None
    assert build_tracer_provider(config, {}) is None
    assert (
        otlp_endpoint(config, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == "http://c:4318/v1/traces"
    )
    assert otlp_endpoint(config, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x"}) == "http://t/x"
    assert (
        otlp_endpoint(TelemetryConfig(otlp_endpoint="http://own"), {"OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
        == "http://own"
    )


def test_missing_otlp_exporter_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigError, match=r"llmrouter\[otlp\]"):
        build_tracer_provider(TelemetryConfig(otlp_endpoint="http://127.0.0.1:1/v1/traces"), {})


def test_json_formatter_one_line_with_extras() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("llmrouter.test.json")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(
            "multi\nline %s", "msg", extra={"request_id": "r1", "tokens": {"prompt": 3}, "obj": object()}
        )
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, "one line per record, newlines escaped"
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "multi\nline msg" and first["level"] == "WARNING"
    assert (
        first["request_id"] == "r1"
        and first["tokens"] == {"prompt": 3}
        and first["obj"].startswith("<object")
    )
    assert first["logger"] == "llmrouter.test.json" and first["timestamp"].endswith("+00:00")
    assert "ValueError: bad" in second["exception"]


def test_library_request_line(caplog: pytest.LogCaptureFixture) -> None:
    import anyio

    caplog.set_level(logging.INFO, logger="llmrouter.access")
    router = Router(hooks=[TelemetryHooks()])
    router.add_deployment("g", ScriptedProvider(default=Step(text="one two")))
    ctx = RequestContext(api_key_id="k1")
    anyio.run(
        lambda: router.chat({"model": "g", "messages": [{"role": "user", "content": "hi"}]}, context=ctx)
    )
    (record,) = [r for r in caplog.records if r.name == "llmrouter.access"]
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == ctx.request_id and line["trace_id"] == trace_id_of(ctx.traceparent)
    assert (line["model"], line["outcome"], line["api_key_id"]) == ("g", "ok", "k1")
    assert line["tokens"]["completion"] == 2 and line["deployment"]


def test_configure_logging_replaces_its_own_handler() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        stream = io.StringIO()
        configure_logging("INFO", stream=io.StringIO())
        configure_logging("DEBUG", stream=stream)
        added = [h for h in root.handlers if h not in before]
        assert len(added) == 1
        logging.getLogger("llmrouter.x").debug("hello", extra={"k": 1})
        assert json.loads(stream.getvalue())["k"] == 1
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
        root.setLevel(level)


def test_a_global_provider_installed_later_is_picked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry import trace

    from llmrouter.telemetry.tracing import RequestTracer

    tracer = RequestTracer()
    assert not tracer.enabled  # the default global provider is a proxy: spans go nowhere
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: TracerProvider())
    assert not tracer.enabled, "looked up at most once a second"
    tracer._next_check = 0.0  # a second later
    assert tracer.enabled
    monkeypatch.undo()
    assert tracer.enabled, "a global provider cannot be uninstalled: found once, kept"
