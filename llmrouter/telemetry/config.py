"""Telemetry configuration: a plain msgspec Struct, no OpenTelemetry imports.

Lives under ``telemetry:`` in the main config::

    telemetry:
      metrics: true                 # GET /metrics (Prometheus text format)
      json_logs: true               # one JSON line per request on stderr
      log_level: INFO
      otlp_endpoint: http://otel-collector:4318/v1/traces   # optional; needs the otlp extra
      service_name: llmrouter

This module is imported by :mod:`llmrouter.config`, so it must stay free of
OpenTelemetry and Litestar imports.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["METRICS_DIR_ENV", "TelemetryConfig"]

METRICS_DIR_ENV = "LLMROUTER_METRICS_DIR"
"""Where multi-worker ``llmrouter serve`` tells its workers to share their metrics (a
folder it makes; see :mod:`llmrouter.telemetry.workers`)."""

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class TelemetryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Metrics, logs and traces of the service (the library records metrics whenever
    :class:`~llmrouter.telemetry.TelemetryHooks` is installed, whatever this says)."""

    metrics: bool = True
    """Serve ``GET /metrics`` from an SDK MeterProvider owned by the service."""
    metrics_path: str = "/metrics"
    json_logs: bool = True
    """Configure the root logger with the JSON formatter (False: leave logging alone)."""
    log_level: LogLevel = "INFO"
    access_log: bool = True
    """One log line per HTTP request (``llmrouter.access`` logger)."""
    quiet_paths: list[str] = msgspec.field(default_factory=lambda: ["/metrics", "/health", "/ready"])
    """Paths whose access lines are logged at DEBUG (probes and scrapes would drown the rest)."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP traces endpoint (e.g. ``http://collector:4318/v1/traces``); None: no export.
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` also enable it."""
    otlp_headers: dict[str, str] = msgspec.field(default_factory=dict)
    service_name: str = "llmrouter"
    """``service.name`` resource attribute on metrics and spans."""
