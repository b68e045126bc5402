"""ASGI middleware: HTTP server duration, the trace header, and the access log line.

For each HTTP request it

1. makes sure the request carries a valid W3C ``traceparent`` (the client's, else a new
   trace; with span export on, its own server span) by rewriting the scope's header,
   so that the controller puts it into ``ctx.traceparent`` and providers forward it
   (``trace_header``; the service leaves this to its router hooks);
2. with the access line on, publishes an
   :class:`~llmrouter.telemetry.logging.AccessRecord` in a context variable, which
   :class:`~llmrouter.telemetry.TelemetryHooks` fill with the router's context;
3. once the response is sent, records ``http.server.request.duration`` (attributes
   ``http.request.method``, ``http.route`` - the route template, never the raw path -,
   ``http.response.status_code``, ``error.type`` for 5xx) and writes the access line.

The path in the access line and the span's ``url.path`` has any API key secret in it cut
to ``sk-llmr-<prefix>-...`` (a leaked key is revoked by naming its secret in
``/v1/admin/keys/{key}``).

Plain ASGI: no Litestar import, so any ASGI application can use it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from llmrouter.asgi import HEAD_KEY, request_method, scope_header, shown_path
from llmrouter.ids import request_id_of
from llmrouter.telemetry.local import Recorder, keep_bound
from llmrouter.telemetry.logging import (
    ACCESS_LOGGER,
    HTTP_LINE,
    UNROUTED_LINE,
    AccessRecord,
    context_fields,
    current_access_record,
    log_request,
)
from llmrouter.telemetry.metrics import RouterMetrics
from llmrouter.telemetry.tracing import (
    RequestTracer,
    TraceParent,
    new_traceparent_header,
    parse_traceparent,
    span_traceparent,
    trace_id_of,
)

__all__ = ["HttpDurations", "TelemetryMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]

_WATCHED_STATUS_KEY = "llmrouter.telemetry.status"
"""Where the middleware notes the response status itself when no ``status_key`` is given."""

_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


class TelemetryMiddleware:
    """Records HTTP metrics, keeps the trace header and logs one line per request.

    Args:
        app: the wrapped ASGI application.
        metrics: instruments (``http.server.request.duration``); None records none.
        tracer: creates the server span when spans are exported; None creates none.
        access_log: write the access line (logger ``llmrouter.access``).
        quiet_paths: paths whose access lines go out at DEBUG (probes, scrapes).
        status_key: the scope key under which a middleware around this one records the
            response status (the service's ``RequestIdMiddleware`` does). Given, the
            status is read there once the app returns, instead of through a wrapper of
            ``send``: a call per message, that is per streamed chunk.
        trace_header: make sure every request carries a valid ``traceparent`` (step 1
            above; always done with a ``tracer``). The service turns it off: its
            :class:`~llmrouter.telemetry.TelemetryHooks` do the same for every request
            that reaches the router, the only ones that call upstream, and the header
            is not rewritten for the rest. (With the access line off, the header and
            the access record cost the service ~12k CPU instructions a request.)
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: RouterMetrics | None = None,
        tracer: RequestTracer | None = None,
        access_log: bool = True,
        quiet_paths: Sequence[str] = (),
        status_key: str | None = None,
        trace_header: bool = True,
    ) -> None:
        self.app = app
        self.trace_header = trace_header
        self.metrics = metrics
        self.tracer = tracer
        self.access_log = access_log
        self.quiet_paths = frozenset(quiet_paths)
        self.status_key = status_key
        self._logger = logging.getLogger(ACCESS_LOGGER)
        self._durations = HttpDurations(metrics) if metrics is not None else None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = request_method(scope)
        route = scope.get("path_template")
        span = None
        traceparent = None
        if self.trace_header or self.tracer is not None:
            span, traceparent = self._trace(scope, method, route)
        record = token = None
        if self.access_log:
            if traceparent is None:
                traceparent = _header_or_new(parse_traceparent(_header(scope, b"traceparent")))
            record = AccessRecord(method, shown_path(scope["path"]), request_id_of(scope), traceparent)
            token = current_access_record.set(record)
        try:
            await self.app(scope, receive, send if self.status_key else _watching_status(scope, send))
        finally:
            if token is not None:
                current_access_record.reset(token)
            # No response started means the app raised: the server answers 500.
            code = scope.get(self.status_key or _WATCHED_STATUS_KEY, 500)
            elapsed = time.perf_counter() - started
            self._record(method, route, code, elapsed, span)
            if record is not None:
                level = logging.DEBUG if record.path in self.quiet_paths else logging.INFO
                if self._logger.isEnabledFor(level):
                    self._log(record, code, elapsed, level)

    def _trace(self, scope: Scope, method: str, route: str | None) -> tuple[Any, str]:
        """Start the server span (with a tracer) and make the scope's ``traceparent``
        valid: the client's, else the span's or a new trace's. Returns both."""
        incoming = _header(scope, b"traceparent")
        parent = parse_traceparent(incoming)
        span = None
        if self.tracer is not None:
            span = self.tracer.start_server_span(
                f"{method} {route}" if route else method,
                parent.header() if parent else None,
                {
                    "http.request.method": _method(method),
                    "http.route": route or "",
                    "url.path": shown_path(scope["path"]),
                },
            )
        traceparent = (span_traceparent(span) if span is not None else None) or _header_or_new(parent)
        if traceparent != incoming:
            _set_header(scope, b"traceparent", traceparent, replace=incoming is not None)
        return span, traceparent

    def _record(self, method: str, route: str | None, code: int, elapsed: float, span: Any) -> None:
        if self._durations is not None:
            self._durations.record(method, route, code, elapsed)
        if span is not None:
            from opentelemetry.trace import Status, StatusCode

            span.set_attribute("http.response.status_code", code)
            if code >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()

    def _log(self, record: AccessRecord, code: int, elapsed: float, level: int) -> None:
        fields: dict[str, Any] = {
            "request_id": record.request_id,
            "trace_id": trace_id_of(record.traceparent),
        }
        line = UNROUTED_LINE
        if record.ctx is not None:
            fields.update(context_fields(record.ctx))
            line = HTTP_LINE
        fields.update(
            method=record.method, path=record.path, status=code, latency_ms=round(elapsed * 1000, 2)
        )
        log_request(self._logger, level, line, fields)


class HttpDurations:
    """Records ``http.server.request.duration`` (see the module's notes) through
    instruments bound once per method, route and status (see
    :mod:`llmrouter.telemetry.local`). :meth:`observe` is a response observer: the
    service uses it instead of :class:`TelemetryMiddleware` when the metric is all there
    is to do (no access line, no spans), which saves an ASGI layer per request."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics
        self._bound: dict[tuple[str, str | None, int], Recorder] = {}

    def record(self, method: str, route: str | None, code: int, elapsed: float) -> None:
        key = (method, route, code)
        record = self._bound.get(key) or self._bind(key)
        record(elapsed)

    def observe(self, scope: Scope, status: int, elapsed: float) -> None:
        # record(), inlined: this runs for every request.
        method = "HEAD" if HEAD_KEY in scope else scope.get("method", "GET")  # request_method(), inlined
        key = (method, scope.get("path_template"), status)
        record = self._bound.get(key) or self._bind(key)
        record(elapsed)

    def _bind(self, key: tuple[str, str | None, int]) -> Recorder:
        recorder = self.metrics.http_server_duration.bind(_duration_attributes(*key))
        return keep_bound(self._bound, key, recorder)  # methods are the client's to make up


def _watching_status(scope: Scope, send: Any) -> Callable[[Message], Awaitable[None]]:
    """``send``, noting the response status in ``scope`` under :data:`_WATCHED_STATUS_KEY`
    (for use without a middleware around this one that records it)."""

    def send_and_watch(message: Message) -> Awaitable[None]:
        # Returns the server's awaitable instead of awaiting it: no coroutine of its own
        # for every message (a stream sends one per chunk).
        if message["type"] == "http.response.start":
            scope[_WATCHED_STATUS_KEY] = int(message["status"])
        return send(message)

    return send_and_watch


def _method(method: str) -> str:
    return method if method in _KNOWN_METHODS else "_OTHER"


# Called once per method, route and status, when HttpDurations binds the histogram (its
# bound recorders are the cache): the (name, value) pairs are the series key.
def _duration_attributes(method: str, route: str | None, code: int) -> tuple[tuple[str, Any], ...]:
    """The attributes of ``http.server.request.duration`` for one response."""
    attributes: tuple[tuple[str, Any], ...] = (
        ("http.request.method", _method(method)),
        ("http.response.status_code", code),
    )
    if route:
        attributes += (("http.route", route),)
    if code >= 500:
        attributes += (("error.type", str(code)),)
    return attributes


def _header_or_new(parent: TraceParent | None) -> str:
    """The header of the client's valid ``traceparent``, else of a new trace."""
    return parent.header() if parent else new_traceparent_header()


def _header(scope: Scope, name: bytes) -> str | None:
    value = scope_header(scope, name)
    return None if value is None else bytes(value).decode("latin-1")


def _set_header(scope: Scope, name: bytes, value: str, *, replace: bool) -> None:
    headers = scope.get("headers", ())
    if replace:
        headers = [(k, v) for k, v in headers if k != name]
    scope["headers"] = [*headers, (name, value.encode("latin-1"))]
