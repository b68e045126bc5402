"""gen_ai.client.operation.time_per_output_chunk in the service: aggregated by
ChunkTimeHistogram (no SDK call per chunk), exported exactly as the OpenTelemetry
Prometheus exporter exports the same observations recorded through the SDK."""

from __future__ import annotations

import pytest

from llmrouter.telemetry.metrics import CHUNK_BUCKETS, ChunkTimeHistogram, RouterMetrics
from llmrouter.telemetry.prometheus import PrometheusMetrics

ATTRIBUTES = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "remote", "gen_ai.request.model": "m"}
OTHER = {**ATTRIBUTES, "gen_ai.request.model": "n"}
# Values on the boundaries too: a value equal to a bound belongs to that bucket.
VALUES = [0.0, 0.0004, 0.001, 0.0011, 0.0025, 0.003, 0.05, 0.1, 0.75, 2.5, 2.6, 30.0]
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def test_buckets_sum_and_count() -> None:
    histogram = ChunkTimeHistogram()
    histogram.record_many(VALUES, ATTRIBUTES)
    histogram.record_many([0.002], OTHER)
    series = {
        attributes["gen_ai.request.model"]: (counts, total)
        for attributes, counts, total in histogram.collect()
    }
    counts, total = series["m"]
    assert len(counts) == len(CHUNK_BUCKETS) + 1
    assert sum(counts) == len(VALUES) and total == pytest.approx(sum(VALUES))
    assert counts[0] == 3  # 0.0, 0.0004 and 0.001 are <= 0.001
    assert counts[1] == 2  # 0.0011, 0.0025
    assert counts[-2] == 1 and counts[-1] == 2  # 2.5 in the last bound; 2.6 and 30 above it
    assert series["n"] == ([0, 1] + [0] * (len(CHUNK_BUCKETS) - 1), 0.002)


def _chunk_lines(prometheus: PrometheusMetrics, accept: str | None) -> list[str]:
    body, _ = prometheus.render(accept)
    return [line for line in body.decode().splitlines() if "time_per_output_chunk" in line]


@pytest.mark.parametrize("accept", [None, OPENMETRICS])
def test_export_matches_the_opentelemetry_exporter(accept: str | None) -> None:
    through_sdk = PrometheusMetrics(process_metrics=False)
    sdk_metrics = RouterMetrics(through_sdk.meter_provider)
    assert sdk_metrics.chunk_times is None and sdk_metrics.time_per_output_chunk is not None
    native = PrometheusMetrics(process_metrics=False)
    native_metrics = RouterMetrics(native.meter_provider, chunk_times=native.chunk_times)
    assert native_metrics.time_per_output_chunk is None  # no second, empty family
    assert _chunk_lines(native, accept) == []  # nothing recorded yet: no series
    for metrics in (sdk_metrics, native_metrics):
        metrics.record_chunk_times(VALUES, ATTRIBUTES)
        metrics.record_chunk_times([0.02, 0.03], OTHER)
    expected = _chunk_lines(through_sdk, accept)
    assert any('gen_ai_request_model="n"' in line for line in expected)
    assert any("_bucket{" in line and 'le="+Inf"' in line for line in expected)
    got = _chunk_lines(native, accept)
    # Same series and values; label order within a series may differ.
    assert sorted(map(_normalized, got)) == sorted(map(_normalized, expected))


def _normalized(line: str) -> str:
    if "{" not in line:
        return line
    name, rest = line.split("{", 1)
    labels, value = rest.rsplit("} ", 1)
    return f"{name}{{{','.join(sorted(labels.split(',')))}}} {value}"
