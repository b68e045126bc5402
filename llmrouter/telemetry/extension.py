"""The service's telemetry: ``GET /metrics``, HTTP middleware, hooks, logs and traces.

``create_app`` picks it up through :func:`llmrouter.telemetry.extension_from_config`;
this is the only telemetry module that imports Litestar.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llmrouter.extension import Extension, Gauge, ResponseObserver
from llmrouter.telemetry.config import METRICS_DIR_ENV, TelemetryConfig
from llmrouter.telemetry.hooks import TelemetryHooks
from llmrouter.telemetry.http import HttpDurations, TelemetryMiddleware
from llmrouter.telemetry.logging import configure_logging, log_event
from llmrouter.telemetry.metrics import RouterMetrics
from llmrouter.telemetry.prometheus import PrometheusMetrics
from llmrouter.telemetry.tracing import RequestTracer, build_tracer_provider, otlp_endpoint

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

    from llmrouter.config import Config
    from llmrouter.hooks import RouterHooks

__all__ = ["TelemetryExtension", "build_telemetry_extension"]

logger = logging.getLogger("llmrouter.telemetry")

FOLD_SECONDS = 1.0
"""How often what bound instruments recorded is folded into the metrics' series (it is
also folded at every scrape); bounds what waits to about a second of requests."""


class TelemetryExtension(Extension):
    """Mounts metrics, logs and traces into the service.

    Args:
        config: the ``telemetry:`` section.
        meter_provider: record into this provider instead of the service's own
            Prometheus one (``/metrics`` is then not served).
        tracer_provider: send spans there instead of an OTLP exporter built from config.
        workers_dir: the folder the workers of a multi-worker server share their metrics
            in, so that ``/metrics`` shows them all (see :mod:`llmrouter.telemetry.workers`).
    """

    name = "telemetry"

    def __init__(
        self,
        config: TelemetryConfig | None = None,
        *,
        meter_provider: MeterProvider | None = None,
        tracer_provider: Any = None,
        workers_dir: str | None = None,
    ) -> None:
        self.config = config or TelemetryConfig()
        self.prometheus: PrometheusMetrics | None = None
        if meter_provider is None and self.config.metrics:
            self.prometheus = PrometheusMetrics(self.config.service_name, workers_dir=workers_dir)
            meter_provider = self.prometheus.meter_provider
        self.metrics = RouterMetrics(meter_provider, local=self.prometheus.local if self.prometheus else None)
        self._owns_tracer_provider = tracer_provider is None
        self.tracer_provider = tracer_provider or build_tracer_provider(self.config)
        self.tracer = RequestTracer(self.tracer_provider) if self.tracer_provider is not None else None
        # The middleware writes the access line; the hooks make sure of the traceparent.
        self.hooks = TelemetryHooks(
            metrics=self.metrics, tracer_provider=self.tracer_provider, log_requests=False
        )
        self._folding: asyncio.Task[None] | None = None

    def router_hooks(self) -> Sequence[RouterHooks]:
        return (self.hooks,)

    def attach(self, router: Any) -> None:
        # Watched from the start: its in-flight gauge and its spans' provider attributes
        # (a watch made at the first scrape left them out until then, and for good with
        # a meter provider of the caller's, which no scrape of ours reaches).
        self.hooks.watch_router(router)

    def middleware(self) -> Sequence[Any]:
        if not self._needs_middleware:
            return ()  # the HTTP duration is all there is: response_observers() records it
        from litestar.middleware import DefineMiddleware

        from llmrouter.server.middleware import STATUS_KEY

        return (
            DefineMiddleware(
                TelemetryMiddleware,  # type: ignore[arg-type]  # plain ASGI typing, not Litestar's
                metrics=self.metrics,
                tracer=self.tracer,
                access_log=self.config.access_log,
                quiet_paths=self.config.quiet_paths,
                # The service's RequestIdMiddleware (around every route's middleware) records it.
                status_key=STATUS_KEY,
                trace_header=False,
            ),
        )

    def response_observers(self) -> Sequence[ResponseObserver]:
        if self._needs_middleware:
            return ()  # TelemetryMiddleware records the HTTP duration
        return (HttpDurations(self.metrics).observe,)

    @property
    def _needs_middleware(self) -> bool:
        """Whether there is more to do per request than the HTTP duration: the access
        line, or the server span."""
        return self.config.access_log or self.tracer is not None

    def route_handlers(self) -> Sequence[Any]:
        if self.prometheus is None:
            return ()
        return (_metrics_handler(self.prometheus, self.config.metrics_path),)

    def export_gauges(self, gauges: Mapping[str, Gauge]) -> None:
        for name, gauge in gauges.items():
            self.metrics.add_gauge(name, gauge)

    async def startup(self) -> None:
        configure_logging(self.config.log_level, json_lines=self.config.json_logs)
        # uvicorn's own access line is either superseded by TelemetryMiddleware's
        # (access_log on) or unwanted (off); configure_logging routes it to the root, so
        # it must be switched off here, or it comes back on every request.
        logging.getLogger("uvicorn.access").disabled = True
        if self.prometheus is not None:
            self.prometheus.publish()  # the other workers' scrapes show this one from now on
            self._folding = asyncio.get_running_loop().create_task(
                self._fold_every(FOLD_SECONDS), name="llmrouter-metrics-fold"
            )
        log_event(
            logger,
            "telemetry started",
            metrics_path=self.config.metrics_path if self.prometheus else None,
            otlp_endpoint=otlp_endpoint(self.config) if self.tracer_provider is not None else None,
            service_name=self.config.service_name,
            json_logs=self.config.json_logs,
        )

    async def _fold_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                self.metrics.fold()
                if self.prometheus is not None:
                    self.prometheus.publish()
            except Exception:  # keep folding; the scrape folds too
                logger.exception("telemetry: folding metrics failed")

    async def shutdown(self) -> None:
        log_event(logger, "telemetry stopping")
        if self._folding is not None:
            self._folding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._folding
            self._folding = None
        if self.tracer_provider is not None and self._owns_tracer_provider:
            # Flushes the spans still queued for export.
            self.tracer_provider.shutdown()
        if self.prometheus is not None:
            self.prometheus.shutdown()

    def readiness(self) -> dict[str, Any]:
        return {
            "metrics": self.prometheus is not None,
            "tracing": self.tracer_provider is not None,
        }


def _metrics_handler(prometheus: PrometheusMetrics, path: str) -> Any:
    from litestar import Request, get
    from litestar.response.base import ASGIResponse

    @get(
        path,
        include_in_schema=False,
        sync_to_thread=False,
        name="llmrouter-metrics",
        # Annotations are strings here (postponed evaluation) and these names are local.
        signature_namespace={"Request": Request, "ASGIResponse": ASGIResponse, "Any": Any},
    )
    def metrics(request: Request[Any, Any, Any]) -> ASGIResponse:
        body, content_type = prometheus.render(request.headers.get("accept"))
        # As the exposition format names itself: as media_type, Litestar adds a second
        # charset to a text/* type, which strict parsers (Go's) refuse.
        return ASGIResponse(body=body, headers={"content-type": content_type})

    return metrics


def build_telemetry_extension(config: Config) -> TelemetryExtension | None:
    """The telemetry extension for a service ``config`` (its ``telemetry:`` section);
    None when metrics, logs and traces are all off, so that nothing runs per request."""
    settings = config.telemetry
    if not (settings.metrics or settings.json_logs or settings.access_log or settings.otlp_endpoint):
        return None
    return TelemetryExtension(settings, workers_dir=os.environ.get(METRICS_DIR_ENV))
