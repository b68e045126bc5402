"""TelemetryMiddleware as plain ASGI: the status it records, watched from ``send`` or
read from the scope key a middleware around it fills (as the service's does); and the
same HTTP duration recorded without it, by HttpDurations observing the responses of the
service's RequestIdMiddleware."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmrouter.server.middleware import RequestIdMiddleware
from llmrouter.telemetry.http import HttpDurations, TelemetryMiddleware
from llmrouter.telemetry.local import LocalMetrics
from llmrouter.telemetry.metrics import RouterMetrics
from llmrouter.telemetry.tracing import RequestTracer, parse_traceparent

pytestmark = pytest.mark.anyio

STATUS_KEY = "test.status"


async def answer_204(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def fail(scope: Any, receive: Any, send: Any) -> None:
    raise RuntimeError("boom")


def recording_status(app: Any) -> Any:
    """What the service's RequestIdMiddleware does: the status into the scope."""

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        async def watch(message: Any) -> None:
            if message["type"] == "http.response.start":
                scope[STATUS_KEY] = message["status"]
            await send(message)

        await app(scope, receive, watch)

    return outer


async def call(app: Any, method: str = "GET", path: str = "/x") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "path_template": "/x"}
    try:
        await app(scope, receive, send)
    except RuntimeError:
        pass
    return sent


def statuses(metrics: RouterMetrics) -> list[int]:
    return sorted(
        attributes["http.response.status_code"]
        for attributes, counts, _ in metrics.http_server_duration.collect()
        for _ in range(sum(counts))
    )


def observed(app: Any, metrics: RouterMetrics) -> Any:
    """``app`` behind the service's RequestIdMiddleware, HttpDurations observing it."""
    middleware = RequestIdMiddleware([HttpDurations(metrics).observe])

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        await middleware.handle(scope, receive, send, app)

    return outer


def measured(app: Any, metrics: RouterMetrics, how: str) -> Any:
    if how == "observer":
        return observed(app, metrics)
    if how == "from the scope":
        return recording_status(
            TelemetryMiddleware(app, metrics=metrics, access_log=False, status_key=STATUS_KEY)
        )
    return TelemetryMiddleware(app, metrics=metrics, access_log=False)


HOW = ["watching send", "from the scope", "observer"]


@pytest.mark.parametrize("how", HOW)
async def test_the_recorded_status(how: str) -> None:
    metrics = RouterMetrics(local=LocalMetrics())
    for app in (answer_204, fail):
        sent = await call(measured(app, metrics, how))
        assert [m["type"] for m in sent] == (
            ["http.response.start", "http.response.body"] if app is answer_204 else []
        )
    assert statuses(metrics) == [204, 500]  # an app that raised: the server answers 500


@pytest.mark.parametrize("how", HOW)
async def test_the_duration_attributes(how: str) -> None:
    metrics = RouterMetrics(local=LocalMetrics())
    for app, method in ((answer_204, "GET"), (answer_204, "BREW"), (fail, "POST"), (answer_204, "GET")):
        await call(measured(app, metrics, how), method)
    series = sorted(
        (sorted(attributes.items()), sum(counts))
        for attributes, counts, _ in metrics.http_server_duration.collect()
    )
    route = ("http.route", "/x")
    assert series == [
        (
            [
                ("error.type", "500"),
                ("http.request.method", "POST"),
                ("http.response.status_code", 500),
                route,
            ],
            1,
        ),
        ([("http.request.method", "GET"), ("http.response.status_code", 204), route], 2),
        ([("http.request.method", "_OTHER"), ("http.response.status_code", 204), route], 1),  # not a method
    ]


async def test_a_failing_observer_is_logged_and_the_next_still_called(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[int] = []

    def broken(scope: Any, status: int, elapsed: float) -> None:
        raise ValueError("observer bug")

    middleware = RequestIdMiddleware([broken, lambda scope, status, elapsed: seen.append(status)])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await middleware.handle(scope, receive, send, answer_204)

    sent = await call(app)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert seen == [204]
    assert "observer bug" in caplog.text


@pytest.mark.parametrize("trace_header", [True, False])
async def test_the_trace_header_is_made_valid_only_when_asked(trace_header: bool) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(dict(scope["headers"]).get(b"traceparent"))
        await answer_204(scope, receive, send)

    middleware = TelemetryMiddleware(app, access_log=False, trace_header=trace_header)
    await call(middleware)
    (header,) = seen
    if trace_header:
        assert parse_traceparent(header.decode()) is not None
    else:
        assert header is None  # left to the router's TelemetryHooks


async def test_a_key_secret_in_the_path_is_cut_in_the_access_line_and_the_span(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # /v1/admin/keys/{key} takes a whole secret as the key (to revoke a leaked one).
    caplog.set_level(logging.INFO, logger="llmrouter.access")
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    middleware = TelemetryMiddleware(answer_204, tracer=RequestTracer(tracer_provider))
    await call(middleware, path="/v1/admin/keys/sk-llmr-w0pckqt9-r3i5rZ3i_Kymx-TeAH5GG08m/rotate")
    await call(middleware, path="/v1/admin/keys/sk-llmr-w0pckqt9-")  # the public form: kept
    shown = ["/v1/admin/keys/sk-llmr-w0pckqt9-.../rotate", "/v1/admin/keys/sk-llmr-w0pckqt9-"]
    lines = [record.__dict__["path"] for record in caplog.records if record.name == "llmrouter.access"]
    spans = [dict(span.attributes or {})["url.path"] for span in exporter.get_finished_spans()]
    assert lines == spans == shown
