"""W3C Trace Context and optional OTLP span export.

The trace of one request::

    client --traceparent--> TelemetryMiddleware   (accept a valid header, else start a trace;
                                                    with OTLP: server span "POST /v1/chat/completions")
        -> scope header rewritten -> the controller copies it to ``ctx.traceparent``
        -> TelemetryHooks.before_request            (no header yet: generate one;
                                                    with OTLP: span "chat <model>", ctx.traceparent
                                                    now names it)
        -> HTTP providers forward ``ctx.traceparent`` (read from ``current_context``) upstream
        -> on_attempt: one CLIENT span per provider call (with OTLP)
        -> after_request ends the request span; the log line carries ``trace_id``.

Without an exporter no span is created: the header is passed on unchanged (or a new
one started), so logs and upstreams still share one trace id.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmrouter.errors import ConfigError
from llmrouter.ids import random_hex

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from llmrouter.telemetry.config import TelemetryConfig

__all__ = [
    "RequestTracer",
    "TraceParent",
    "build_tracer_provider",
    "new_traceparent",
    "new_traceparent_header",
    "parse_traceparent",
    "trace_id_of",
]


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A parsed ``traceparent`` header (version 00 fields)."""

    trace_id: str
    span_id: str
    flags: str = "01"

    @property
    def sampled(self) -> bool:
        return int(self.flags, 16) & 1 == 1

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceParent:
        """The same trace, a new span id (what a participant sends on)."""
        return TraceParent(self.trace_id, random_hex(16), self.flags)


# version-traceid-spanid-flags, lowercase hex; versions after 00 may append "-" fields.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def parse_traceparent(value: str | None) -> TraceParent | None:
    """Parse a ``traceparent`` header; None when absent or invalid (per W3C Trace Context)."""
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    # Version ff is forbidden; version 00 has exactly four fields.
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceParent(trace_id, span_id, flags)


def new_traceparent() -> TraceParent:
    """Start a new, sampled trace."""
    return TraceParent(random_hex(32), random_hex(16), "01")


def new_traceparent_header() -> str:
    """The header of a new, sampled trace (``new_traceparent().header()``, per request)."""
    return f"00-{random_hex(32)}-{random_hex(16)}-01"


def trace_id_of(value: str | None) -> str | None:
    """The trace id of a ``traceparent`` header, or None when it is invalid."""
    parsed = parse_traceparent(value)
    return parsed.trace_id if parsed else None


def _otel_context(traceparent: str | None) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not traceparent:
        return None
    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def span_traceparent(span: Span) -> str | None:
    """The header naming ``span`` as the parent, or None for a non-recording span."""
    context = span.get_span_context()
    if not span.is_recording() or not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def perf_to_ns(perf: float) -> int:
    """Convert a ``time.perf_counter()`` reading to Unix nanoseconds (span timestamps)."""
    return time.time_ns() - int((time.perf_counter() - perf) * 1e9)


_GLOBAL_PROVIDER_CHECK_S = 1.0


class RequestTracer:
    """Creates llmrouter's spans on an OpenTelemetry tracer.

    Args:
        tracer_provider: where spans go; None uses the global TracerProvider (a no-op
            unless the application installed an SDK one).
    """

    def __init__(self, tracer_provider: Any = None) -> None:
        from opentelemetry import trace

        self._trace = trace
        self._enabled = tracer_provider is not None
        self._next_check = 0.0
        self.tracer: Tracer = trace.get_tracer("llmrouter", tracer_provider=tracer_provider)

    @property
    def enabled(self) -> bool:
        """False while spans would go nowhere (no provider given, no SDK one installed
        globally): callers then skip span work on the hot path.

        The global provider is looked up at most once a second (each lookup reads an
        environment variable, ~2% of the gateway's CPU when done per request); it can be
        installed only once, so once found it stays."""
        return self._enabled or self.enabled_at(time.perf_counter())

    def enabled_at(self, now: float) -> bool:
        """:attr:`enabled`, with ``now`` a recent ``time.perf_counter()`` reading (a
        request's start): the hot path then reads no clock."""
        if self._enabled:
            return True
        if now >= self._next_check:
            self._next_check = now + _GLOBAL_PROVIDER_CHECK_S
            provider = self._trace.get_tracer_provider()
            self._enabled = not isinstance(
                provider, (self._trace.ProxyTracerProvider, self._trace.NoOpTracerProvider)
            )
        return self._enabled

    def start_server_span(self, name: str, traceparent: str | None, attributes: dict[str, Any]) -> Span:
        """The HTTP server span (kind SERVER), child of the caller's ``traceparent``."""
        return self.tracer.start_span(
            name, context=_otel_context(traceparent), kind=self._trace.SpanKind.SERVER, attributes=attributes
        )

    def start_request_span(self, name: str, traceparent: str | None, attributes: dict[str, Any]) -> Span:
        """The router's span for one request (kind INTERNAL)."""
        return self.tracer.start_span(name, context=_otel_context(traceparent), attributes=attributes)

    def record_call_span(
        self,
        parent: Span,
        name: str,
        attributes: dict[str, Any],
        *,
        start_ns: int,
        error: BaseException | None,
    ) -> None:
        """A provider call that just ended (kind CLIENT), created after the fact from its times."""
        from opentelemetry.trace import Status, StatusCode

        context = self._trace.set_span_in_context(parent)
        span = self.tracer.start_span(
            name,
            context=context,
            kind=self._trace.SpanKind.CLIENT,
            attributes=attributes,
            start_time=start_ns,
        )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        span.end()


def otlp_endpoint(config: TelemetryConfig, env: dict[str, str] | None = None) -> str | None:
    """The OTLP/HTTP traces endpoint from the config, else from the standard variables."""
    env = dict(os.environ) if env is None else env
    if config.otlp_endpoint:
        return config.otlp_endpoint
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return base.rstrip("/") + "/v1/traces" if base else None


def build_tracer_provider(
    config: TelemetryConfig, env: dict[str, str] | None = None
) -> TracerProvider | None:
    """An SDK TracerProvider exporting over OTLP/HTTP, or None when no endpoint is set.

    Raises:
        ConfigError: an endpoint is set but ``opentelemetry-exporter-otlp-proto-http``
            is not installed (``pip install 'llmrouter[otlp]'``).
    """
    endpoint = otlp_endpoint(config, env)
    if endpoint is None:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ConfigError(
            "telemetry.otlp_endpoint is set but the OTLP exporter is not installed: "
            "pip install 'llmrouter[otlp]'"
        ) from exc
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    exporter = OTLPSpanExporter(endpoint=endpoint, headers=dict(config.otlp_headers) or None)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
