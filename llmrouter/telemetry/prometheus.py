"""The service's own MeterProvider, exported in the Prometheus text format.

The app serves the scrape itself (``GET /metrics``); no second HTTP server is started.
Each :class:`PrometheusMetrics` has its own ``prometheus_client`` registry, so several
apps in one process (tests, embedded use) don't collide, and the global MeterProvider
stays the application's to set.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from llmrouter.telemetry.metrics import CHUNK_TIME_DESCRIPTION, CHUNK_TIME_NAME, ChunkTimeHistogram, _version

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
        # Per-chunk observations bypass the SDK (see ChunkTimeHistogram); pass this to
        # RouterMetrics(chunk_times=...). Exported as the SDK's exporter would write it.
        self.chunk_times = ChunkTimeHistogram()
        self.registry.register(_ChunkTimeCollector(self.chunk_times))
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


def _label(name: str) -> str:
    """An attribute key as the OpenTelemetry Prometheus exporter writes it."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


class _ChunkTimeCollector(Collector):
    """Exports a :class:`ChunkTimeHistogram` with the series the OpenTelemetry exporter
    writes for the same histogram (name, unit suffix, labels, ``otel_scope_*``)."""

    def __init__(self, histogram: ChunkTimeHistogram) -> None:
        self.histogram = histogram
        self.scope = {
            "otel_scope_name": "llmrouter",
            "otel_scope_schema_url": "",
            "otel_scope_version": _version(),
        }
        self.bounds = [floatToGoString(b) for b in histogram.boundaries] + ["+Inf"]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        series = self.histogram.collect()
        if not series:
            return
        family = HistogramMetricFamily(_label(CHUNK_TIME_NAME), CHUNK_TIME_DESCRIPTION, unit="seconds")
        for attributes, counts, total in series:
            labels = {_label(k): str(v) for k, v in attributes.items()} | self.scope
            cumulative = 0
            for bound, count in zip(self.bounds, counts, strict=True):
                cumulative += count
                family.samples.append(
                    Sample(f"{family.name}_bucket", {**labels, "le": bound}, float(cumulative))
                )
            family.samples.append(Sample(f"{family.name}_count", labels, float(cumulative)))
            family.samples.append(Sample(f"{family.name}_sum", labels, total))
        yield family
