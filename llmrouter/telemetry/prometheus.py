"""The service's own MeterProvider, exported in the Prometheus text format.

The app serves the scrape itself (``GET /metrics``); no second HTTP server is started.
Each :class:`PrometheusMetrics` has its own ``prometheus_client`` registry, so several
apps in one process (tests, embedded use) don't collide, and the global MeterProvider
stays the application's to set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.exporter.prometheus._mapping import map_unit, sanitize_attribute, sanitize_full_name
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from llmrouter.telemetry.local import LocalCounter, LocalHistogram, LocalMetrics
from llmrouter.telemetry.metrics import _version
from llmrouter.telemetry.workers import WorkerMetrics

__all__ = ["PrometheusMetrics"]


class PrometheusMetrics:
    """An SDK MeterProvider whose reader is a Prometheus collector on a private registry.

    Args:
        service_name: the ``service.name`` resource attribute (``target_info``).
        process_metrics: also export the process' CPU, memory, file descriptors and GC.
        workers_dir: the folder the workers of a multi-worker server share their
            metrics in (see :mod:`llmrouter.telemetry.workers`); None for one process.
    """

    def __init__(
        self, service_name: str = "llmrouter", *, process_metrics: bool = True, workers_dir: str | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self.reader = PrometheusMetricReader(registry=self.registry)
        # Histograms and counters recorded on the request path skip the SDK (see
        # llmrouter.telemetry.local): pass this to RouterMetrics(local=...).
        self.local = LocalMetrics()
        self.registry.register(_LocalCollector(self.local))
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
        self.workers = WorkerMetrics(workers_dir, self.registry) if workers_dir else None

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape body and its content type (OpenMetrics when the scraper asks for it);
        with ``workers_dir``, every worker's series."""
        encoder, content_type = choose_encoder(accept or "")
        if self.workers is None:
            return encoder(self.registry), content_type
        self.workers.publish()
        return encoder(self.workers.registry), content_type

    def publish(self) -> None:
        """Share this worker's series with the others (with ``workers_dir``; else nothing)."""
        if self.workers is not None:
            self.workers.publish()

    def shutdown(self) -> None:
        if self.workers is not None:
            self.workers.remove()
        self.meter_provider.shutdown()


class _LocalCollector(Collector):
    """Exports :class:`LocalMetrics` as the OpenTelemetry Prometheus exporter exports the
    same instruments (its naming helpers; scope labels; label sets backfilled with "")."""

    def __init__(self, local: LocalMetrics) -> None:
        self.local = local
        self.scope = {
            "otel_scope_name": "llmrouter",
            "otel_scope_version": _version(),
            "otel_scope_schema_url": "",
        }

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        for instrument in self.local.instruments:
            points: list[tuple[dict[str, Any], Any]]
            if isinstance(instrument, LocalHistogram):
                points = [(attributes, (counts, total)) for attributes, counts, total in instrument.collect()]
            else:
                points = instrument.collect()
            if not points:
                continue  # nothing recorded yet: no family, as with the SDK
            rows = [self._labels(attributes) for attributes, _ in points]
            label_keys = sorted({key for row in rows for key in row})
            name, unit = sanitize_full_name(instrument.name), map_unit(instrument.unit)
            family: CounterMetricFamily | HistogramMetricFamily
            if isinstance(instrument, LocalCounter):
                family = CounterMetricFamily(name, instrument.description, labels=label_keys, unit=unit)
                for row, (_, value) in zip(rows, points, strict=True):
                    family.add_metric([row.get(k, "") for k in label_keys], value)
            else:
                family = HistogramMetricFamily(name, instrument.description, labels=label_keys, unit=unit)
                bounds = [f"{bound}" for bound in instrument.boundaries] + ["+Inf"]
                for row, (_, (counts, total)) in zip(rows, points, strict=True):
                    cumulative, buckets = 0, []
                    for bound, count in zip(bounds, counts, strict=True):
                        cumulative += count
                        buckets.append((bound, cumulative))
                    family.add_metric([row.get(k, "") for k in label_keys], buckets, total)
            yield family

    def _labels(self, attributes: dict[str, Any]) -> dict[str, str]:
        labels = {sanitize_attribute(k): v for k, v in self.scope.items()}
        for key, value in attributes.items():
            labels[sanitize_attribute(key)] = (
                value if isinstance(value, str) else json.dumps(value, default=str)
            )
        return labels
