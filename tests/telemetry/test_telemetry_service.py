"""The telemetry extension inside the service: /metrics, HTTP duration, traceparent, access lines."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from llmrouter.context import RequestContext, current_context
from llmrouter.errors import RateLimitError
from llmrouter.hooks import RouterHooks
from llmrouter.router import Router
from llmrouter.server import create_app
from llmrouter.telemetry import JsonFormatter, TelemetryConfig
from llmrouter.telemetry.extension import TelemetryExtension
from llmrouter.telemetry.tracing import parse_traceparent
from llmrouter.testing.scripted import ScriptedProvider, Step

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there friend"}]}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class TraceRecordingProvider(ScriptedProvider):
    """Remembers the traceparent an HTTP provider would forward upstream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.traceparents: list[str | None] = []

    async def chat(self, request: Any) -> Any:
        ctx = current_context.get()
        self.traceparents.append(ctx.traceparent if ctx else None)
        return await super().chat(request)


class RefuseKey(RouterHooks):
    async def before_request(self, ctx: RequestContext) -> None:
        if ctx.request is not None and ctx.request.user == "over-limit":
            raise RateLimitError("slow down", retry_after=3)


@pytest.fixture
def provider() -> TraceRecordingProvider:
    return TraceRecordingProvider("upstream-m", default=Step(text="general kenobi you are bold"))


@pytest.fixture
def client(provider: TraceRecordingProvider) -> Iterator[TestClient[Any]]:
    router = Router(hooks=[RefuseKey()])
    router.add_deployment("m", provider)
    extension = TelemetryExtension(TelemetryConfig(json_logs=False))
    with TestClient(create_app(router=router, extensions=[extension])) as test_client:
        yield test_client


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == "llmrouter.access"]


def test_metrics_endpoint_after_traffic(client: TestClient[Any]) -> None:
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert client.post("/v1/chat/completions", json={**CHAT, "stream": True}).status_code == 200
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert response.headers["content-type"].count("charset") == 1
    text = response.text
    assert (
        metric_value(
            text,
            "http_server_request_duration_seconds_count",
            http_route="/v1/chat/completions",
            http_request_method="POST",
            http_response_status_code="200",
        )
        == 2
    )
    assert (
        metric_value(
            text, "gen_ai_client_token_usage_sum", gen_ai_token_type="output", gen_ai_request_model="m"
        )
        == 10
    )
    assert metric_value(text, "gen_ai_client_operation_time_to_first_chunk_seconds_count") == 1
    # The stream's chunks after the first, one observation each (ChunkTimeHistogram).
    stream_body = client.post("/v1/chat/completions", json={**CHAT, "stream": True}).text
    chunks = sum(1 for line in stream_body.splitlines() if line.startswith("data: {"))
    per_chunk = "gen_ai_client_operation_time_per_output_chunk_seconds_count"
    assert chunks > 2
    assert metric_value(client.get("/metrics").text, per_chunk, gen_ai_request_model="m") == 2 * (chunks - 1)
    assert (
        metric_value(text, "gen_ai_client_operation_duration_seconds_count", gen_ai_operation_name="chat")
        == 2
    )
    assert 'service_name="llmrouter"' in text  # target_info
    assert "process_cpu_seconds_total" in text
    # No request ids or prompt text among the label values.
    assert "hello there" not in text and not re.search(r'="[0-9a-f]{32}"', text)


def test_openmetrics_when_asked(client: TestClient[Any]) -> None:
    response = client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_incoming_traceparent_reaches_the_provider_and_the_log(
    client: TestClient[Any], provider: TraceRecordingProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmrouter.access")
    client.post(
        "/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT, "x-request-id": "req-42"}
    )
    assert provider.traceparents == [TRACEPARENT]
    (line,) = [entry for entry in access_lines(caplog) if entry["path"] == "/v1/chat/completions"]
    assert line["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert line["request_id"] == "req-42"
    assert (line["method"], line["status"], line["model"], line["level"]) == ("POST", 200, "m", "INFO")
    assert line["deployment"] and line["tokens"]["completion"] == 5 and line["latency_ms"] >= 0
    assert line["timestamp"].endswith("+00:00") and line["cache"] is None


@pytest.mark.parametrize("header", [None, "garbage", "00-" + "0" * 32 + "-b7ad6b7169203331-01"])
def test_missing_or_invalid_traceparent_starts_a_trace(
    client: TestClient[Any], provider: TraceRecordingProvider, header: str | None
) -> None:
    headers = {"traceparent": header} if header else {}
    client.post("/v1/chat/completions", json=CHAT, headers=headers)
    (sent,) = provider.traceparents
    parsed = parse_traceparent(sent)
    assert parsed is not None and sent != header


def test_the_access_line_names_the_trace_sent_upstream(
    client: TestClient[Any], provider: TraceRecordingProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmrouter.access")
    client.post("/v1/chat/completions", json=CHAT, headers={"traceparent": "garbage"})
    (sent,) = provider.traceparents
    (line,) = [entry for entry in access_lines(caplog) if entry["path"] == "/v1/chat/completions"]
    parsed = parse_traceparent(sent)
    assert parsed is not None and line["trace_id"] == parsed.trace_id


@pytest.mark.parametrize("header", [None, "garbage", TRACEPARENT])
def test_without_the_access_line_the_trace_still_reaches_upstream(
    provider: TraceRecordingProvider, caplog: pytest.LogCaptureFixture, header: str | None
) -> None:
    caplog.set_level(logging.INFO, logger="llmrouter.access")
    router = Router()
    router.add_deployment("m", provider)
    extension = TelemetryExtension(TelemetryConfig(json_logs=False, access_log=False))
    with TestClient(create_app(router=router, extensions=[extension])) as client:
        headers = {"traceparent": header} if header else {}
        assert client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
        scrape = client.get("/metrics").text
    (sent,) = provider.traceparents
    parsed = parse_traceparent(sent)
    assert parsed is not None and (sent == TRACEPARENT) == (header == TRACEPARENT)
    assert access_lines(caplog) == []  # neither the middleware nor the hooks wrote one
    assert (
        metric_value(scrape, "http_server_request_duration_seconds_count", http_response_status_code="200")
        >= 1
    )


def test_rate_limited_request_is_counted_and_logged(
    client: TestClient[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmrouter.access")
    response = client.post("/v1/chat/completions", json={**CHAT, "user": "over-limit"})
    assert response.status_code == 429
    text = client.get("/metrics").text
    assert (
        metric_value(text, "llmrouter_requests_rejected_total", llmrouter_rejection_reason="rate_limited")
        == 1
    )
    (line,) = [entry for entry in access_lines(caplog) if entry["path"] == "/v1/chat/completions"]
    assert line["status"] == 429 and line["error"]["type"] == "RateLimitError"


def test_the_access_line_names_the_request_id_the_client_got(
    client: TestClient[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmrouter.access")
    answered = client.post("/v1/chat/completions", json=CHAT)
    refused = client.post("/v1/chat/completions", content=b"{not json")  # before any router context
    assert (answered.status_code, refused.status_code) == (200, 400)
    lines = [entry for entry in access_lines(caplog) if entry["path"] == "/v1/chat/completions"]
    assert [line["request_id"] for line in lines] == [r.headers["x-request-id"] for r in (answered, refused)]


def test_probe_and_scrape_lines_are_debug(client: TestClient[Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="llmrouter.access")
    client.get("/health")
    client.get("/v1/models")
    levels = {entry["path"]: entry["level"] for entry in access_lines(caplog)}
    assert levels == {"/health": "DEBUG", "/v1/models": "INFO"}


def test_traceparent_propagates_to_an_http_upstream() -> None:
    """Through the remote provider and the fake OpenAI upstream, with the app's own
    extension discovery (``default_extensions``), as ``llmrouter serve`` builds it."""
    from llmrouter.config import parse_config
    from llmrouter.server.app import default_extensions
    from llmrouter.testing.upstream import FakeUpstream

    with FakeUpstream(models=["up"], reply="pong") as fake:
        config = parse_config(
            {
                "models": [
                    {
                        "name": "m",
                        "deployments": [{"provider": "remote", "model": "up", "base_url": fake.base_url}],
                    }
                ],
                "discover": False,
                "accounting": {"enabled": False},
                "cache": {"backend": "none"},
                "telemetry": {"json_logs": False},
            },
            env={},
        )
        extensions = default_extensions(config)
        assert "telemetry" in [ext.name for ext in extensions]
        with TestClient(create_app(config, extensions=extensions)) as client:
            assert (
                client.post(
                    "/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT}
                ).status_code
                == 200
            )
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            scrape = client.get("/metrics").text
        first, second = (parse_traceparent(r.headers.get("traceparent")) for r in fake.requests)
    assert first is not None and first.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert second is not None and second.trace_id != first.trace_id, "a new trace for a request without one"
    assert metric_value(scrape, "llmrouter_deployment_in_flight", llmrouter_deployment="remote/up") == 0


def test_importing_config_and_telemetry_loads_no_opentelemetry() -> None:
    import subprocess
    import sys

    code = (
        "import sys, llmrouter.config, llmrouter.telemetry; "
        "from llmrouter.telemetry import TelemetryConfig; "
        "print(','.join(m for m in ('opentelemetry', 'prometheus_client', 'litestar') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("access_log", [True, False])
def test_the_http_duration_with_or_without_the_telemetry_middleware(
    provider: TraceRecordingProvider, access_log: bool
) -> None:
    # Without the access line (and spans) the HTTP duration is all there is to do per
    # request: a response observer records it, and no middleware of its own is installed.
    router = Router()
    router.add_deployment("m", provider)
    extension = TelemetryExtension(TelemetryConfig(json_logs=False, access_log=access_log))
    assert bool(extension.middleware()) == access_log
    assert bool(extension.response_observers()) != access_log
    with TestClient(create_app(router=router, extensions=[extension])) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert client.post("/v1/chat/completions", json={"model": "m"}).status_code == 400
        assert client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}).status_code == 404
        assert client.head("/v1/models").status_code == 200  # answered by the GET route
        scrape = client.get("/metrics").text
    head = metric_value(
        scrape,
        "http_server_request_duration_seconds_count",
        http_route="/v1/models",
        http_request_method="HEAD",
        http_response_status_code="200",
    )
    assert head == 1  # counted as the HEAD it was
    for status in ("200", "400", "404"):
        count = metric_value(
            scrape,
            "http_server_request_duration_seconds_count",
            http_route="/v1/chat/completions",
            http_request_method="POST",
            http_response_status_code=status,
        )
        assert count == 1, status


def test_the_services_router_is_watched_from_the_start_with_a_meter_provider_of_ones_own() -> None:
    # Before: only a scrape of /metrics watched it, so with the caller's meter provider
    # (no /metrics of ours) the in-flight gauge never came, and CLIENT spans lacked the
    # provider and model.
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    reader, exporter = InMemoryMetricReader(), InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    router = Router()
    router.add_deployment("m", ScriptedProvider("upstream-m", default=Step(text="hi")))
    extension = TelemetryExtension(
        TelemetryConfig(json_logs=False),
        meter_provider=MeterProvider(metric_readers=[reader]),
        tracer_provider=tracer_provider,
    )
    with TestClient(create_app(router=router, extensions=[extension])) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert client.get("/metrics").status_code == 404  # not ours to serve
        data = reader.get_metrics_data()
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert "llmrouter.deployment.in_flight" in names
    (client_span,) = [s for s in exporter.get_finished_spans() if s.kind.name == "CLIENT"]
    assert client_span.attributes is not None
    assert client_span.attributes["gen_ai.provider.name"] == "scripted"


@pytest.mark.parametrize(
    "traceparent", [None, "garbage", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]
)
def test_a_request_refused_before_the_telemetry_hooks_still_logs_its_trace(
    client: TestClient[Any], caplog: pytest.LogCaptureFixture, traceparent: str | None
) -> None:
    # An unknown model: refused before any hook's before_request (before: "trace_id": null).
    caplog.set_level(logging.INFO, logger="llmrouter.access")
    headers = {"traceparent": traceparent} if traceparent else {}
    refused = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=headers)
    assert refused.status_code == 404
    (line,) = [entry for entry in access_lines(caplog) if entry["path"] == "/v1/chat/completions"]
    assert line["trace_id"] and len(line["trace_id"]) == 32
    if traceparent and traceparent != "garbage":
        assert line["trace_id"] == traceparent.split("-")[1]
