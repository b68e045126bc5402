"""Metrics, JSON logs and traces for llmrouter, on OpenTelemetry.

Library use (metrics go to the global MeterProvider, so your own SDK set-up is honoured)::

    from llmrouter import Router
    from llmrouter.telemetry import TelemetryHooks

    router = Router(config, hooks=[TelemetryHooks()])

The service mounts :class:`~llmrouter.telemetry.extension.TelemetryExtension`
(``build_telemetry_extension(config)``): ``GET /metrics``, the HTTP duration
middleware, one JSON log line per request, ``traceparent`` handling and optional
OTLP trace export. See ``docs/telemetry.md``.

Importing this package is cheap: OpenTelemetry is imported only by the submodules
that need it (``llmrouter.telemetry.config`` is imported by ``llmrouter.config``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmrouter.lazy import lazy_exports
from llmrouter.telemetry.config import TelemetryConfig

if TYPE_CHECKING:
    from llmrouter.config import Config
    from llmrouter.extension import Extension
    from llmrouter.telemetry.extension import TelemetryExtension, build_telemetry_extension
    from llmrouter.telemetry.hooks import TelemetryHooks
    from llmrouter.telemetry.logging import JsonFormatter, configure_logging
    from llmrouter.telemetry.metrics import RouterMetrics

__all__ = [
    "JsonFormatter",
    "RouterMetrics",
    "TelemetryConfig",
    "TelemetryExtension",
    "TelemetryHooks",
    "build_telemetry_extension",
    "configure_logging",
    "extension_from_config",
]

_LAZY = {
    "JsonFormatter": "llmrouter.telemetry.logging",
    "RouterMetrics": "llmrouter.telemetry.metrics",
    "TelemetryExtension": "llmrouter.telemetry.extension",
    "TelemetryHooks": "llmrouter.telemetry.hooks",
    "build_telemetry_extension": "llmrouter.telemetry.extension",
    "configure_logging": "llmrouter.telemetry.logging",
}


__getattr__ = lazy_exports(__name__, _LAZY)


def extension_from_config(config: Config) -> Extension | None:
    """The service's telemetry extension, or None (with a warning) when OpenTelemetry
    is not installed (``pip install 'llmrouter[telemetry]'``)."""
    try:
        from llmrouter.telemetry.extension import build_telemetry_extension
    except ImportError as exc:
        import logging

        logging.getLogger("llmrouter.telemetry").warning(
            "telemetry off (%s): pip install 'llmrouter[telemetry]' for /metrics and JSON logs", exc
        )
        return None
    return build_telemetry_extension(config)
