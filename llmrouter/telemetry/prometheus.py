"""The service's own MeterProvider, exported in the Prometheus text format.

The app serves the scrape itself (``GET /metrics``); no second HTTP server is started.
Each :class:`PrometheusMetrics` has its own ``prometheus_client`` registry, so several
apps in one process (tests, embedded use) don't collide, and the global MeterProvider
stays the application's to set.
"""

from __future__ import annotations

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder

__all__ = ["PrometheusMetrics"]


class PrometheusMetrics:
    """An SDK MeterProvider whose reader is a Prometheus collector on a private registry.

    Args:
        service_name: the ``service.name`` resource attribute (``target_info``).
        process_metrics: also export the process' CPU, memory, file descriptors and GC.
    """

    def __init__(self, service_name: str = "llmrouter", *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.reader = PrometheusMetricReader(registry=self.registry)
        # No exemplars: the Prometheus exporter drops them anyway, and sampling them costs a
        # quarter of every record() (a current-span lookup), which runs per stream chunk.
        self.meter_provider = MeterProvider(
            metric_readers=[self.reader],
            resource=Resource.create({"service.name": service_name}),
            exemplar_filter=AlwaysOffExemplarFilter(),
        )
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape body and its content type (OpenMetrics when the scraper asks for it)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def shutdown(self) -> None:
        self.meter_provider.shutdown()
