"""The service's histograms and counters are aggregated in process (llmrouter.telemetry.local,
no SDK call per observation) and exported exactly as the OpenTelemetry Prometheus exporter
exports the same observations recorded through the SDK."""

from __future__ import annotations

import asyncio
import math
import random
import re
from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest

from llmrouter.telemetry.local import BOUND_MEMORY, LocalCounter, LocalHistogram, keep_bound
from llmrouter.telemetry.metrics import CHUNK_BUCKETS, RouterMetrics
from llmrouter.telemetry.prometheus import PrometheusMetrics

ATTRIBUTES = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "remote", "gen_ai.request.model": "m"}
OTHER = {**ATTRIBUTES, "gen_ai.request.model": "n"}
# Values on the boundaries too: a value equal to a bound belongs to that bucket.
VALUES = [0.0, 0.0004, 0.001, 0.0011, 0.0025, 0.003, 0.05, 0.1, 0.75, 2.5, 2.6, 30.0]
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
TARGET_INFO = re.compile(r"^(# (HELP|TYPE|UNIT) target(_info)? |target_info\{)")


def test_histogram_buckets_sum_and_count() -> None:
    histogram = LocalHistogram("h", "s", "", CHUNK_BUCKETS)
    histogram.record_many(VALUES, ATTRIBUTES)
    histogram.record(0.002, OTHER)
    histogram.record_many([-1.0, math.nan, math.inf], ATTRIBUTES)  # dropped, as the SDK drops them
    histogram.record_many([0.0, math.nan], OTHER)  # a NaN after a valid value: only it is dropped
    histogram.record_many([], OTHER)
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
    assert series["n"] == ([1, 1] + [0] * (len(CHUNK_BUCKETS) - 1), 0.002)


def test_record_many_counts_as_recording_each_value() -> None:
    # Unsorted, with repeats, values on the bounds and above them: the bucketing by
    # bisection of sorted values must agree with bucketing each value.
    rng = random.Random(7)
    values = [rng.choice([*CHUNK_BUCKETS, rng.uniform(0, 3), rng.expovariate(200)]) for _ in range(500)]
    together, one_by_one = (LocalHistogram("h", "s", "", CHUNK_BUCKETS) for _ in range(2))
    for start in range(0, len(values), 20):
        together.record_many(values[start : start + 20], ATTRIBUTES)
    for value in values:
        one_by_one.record(value, ATTRIBUTES)
    [(_, counts, total)], [(_, expected_counts, expected_total)] = together.collect(), one_by_one.collect()
    assert counts == expected_counts
    assert total == pytest.approx(expected_total)


def test_histogram_series_that_differ_only_in_attribute_order_are_one() -> None:
    histogram = LocalHistogram("h", "s", "", CHUNK_BUCKETS)
    histogram.record(0.002, {"a": "x", "b": "y"})
    histogram.record_many([0.003, 5.0], {"b": "y", "a": "x"})
    ((attributes, counts, total),) = histogram.collect()
    assert attributes == {"a": "x", "b": "y"}
    assert counts[1:3] == [1, 1] and counts[-1] == 1 and sum(counts) == 3
    assert total == pytest.approx(5.005)


def test_counter_sums_per_attribute_set() -> None:
    counter = LocalCounter("c", "{request}", "")
    for amount, attributes in ((1, {"a": "x", "b": "y"}), (2, {"b": "y", "a": "x"}), (0.5, None), (-3, None)):
        counter.add(amount, attributes)
    assert sorted(counter.collect(), key=repr) == sorted([({"a": "x", "b": "y"}, 3), ({}, 0.5)], key=repr)


class _AsPairs:
    """RouterMetrics whose instruments get their attributes as (name, value) pairs, the
    way the hooks and the HTTP middleware pass them."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics

    def record_chunk_times(self, values: Any, attributes: dict[str, Any]) -> None:
        self._metrics.record_chunk_times(values, tuple(attributes.items()))

    def __getattr__(self, name: str) -> Any:
        instrument = getattr(self._metrics, name)
        return SimpleNamespace(
            **{
                method: partial(_with_pairs, getattr(instrument, method))
                for method in ("record", "add")
                if hasattr(type(instrument), method)
            }
        )


def _with_pairs(call: Any, amount: float, attributes: dict[str, Any]) -> None:
    call(amount, tuple(attributes.items()))


class _Bound:
    """RouterMetrics recorded through bound instruments, as the request path records:
    ``instrument.bind(attributes)(amount)``."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics

    def record_chunk_times(self, values: Any, attributes: dict[str, Any]) -> None:
        self._metrics.record_chunk_times(values, attributes)

    def __getattr__(self, name: str) -> Any:
        instrument = getattr(self._metrics, name)

        def bound(amount: float, attributes: dict[str, Any]) -> None:
            instrument.bind(tuple(attributes.items()))(amount)

        return SimpleNamespace(record=bound, add=bound)


def _record_everything(metrics: Any) -> None:
    failed = {**ATTRIBUTES, "error.type": "UpstreamError"}
    metrics.record_chunk_times(VALUES, ATTRIBUTES)
    metrics.record_chunk_times([0.02, 0.03], OTHER)
    for value, attributes in ((0.3, ATTRIBUTES), (2.0, failed), (100.0, OTHER)):
        metrics.operation_duration.record(value, attributes)
    metrics.time_to_first_chunk.record(0.004, ATTRIBUTES)
    metrics.token_usage.record(12, {**ATTRIBUTES, "gen_ai.token.type": "input"})
    metrics.token_usage.record(70_000_000, {**ATTRIBUTES, "gen_ai.token.type": "output"})
    metrics.http_server_duration.record(
        0.01, {"http.request.method": "POST", "http.response.status_code": 200}
    )
    metrics.http_server_duration.record(
        0.5,
        {
            "http.request.method": "GET",
            "http.route": "/v1/models",
            "http.response.status_code": 503,
            "error.type": "503",
        },
    )
    metrics.cost.add(0.25, {"llmrouter.api_key.id": "none", "gen_ai.request.model": "m"})
    metrics.cost.add(1.5e-7, {"llmrouter.api_key.id": "k1", "gen_ai.request.model": "m"})
    metrics.cache_requests.add(1, {"llmrouter.cache.status": "miss", "gen_ai.request.model": "m"})
    metrics.retries.add(2, {"gen_ai.request.model": "m"})
    metrics.fallbacks.add(1, {"gen_ai.request.model": "m", "llmrouter.fallback.model": "n"})
    metrics.attempts.add(1, {"llmrouter.deployment": "d", "llmrouter.outcome": "ok"})
    metrics.attempts.add(1, {"llmrouter.deployment": "d", "llmrouter.outcome": "error", "error.type": "X"})
    metrics.cooldowns.add(1, {"llmrouter.deployment": "d"})
    metrics.rejected.add(1, {"llmrouter.rejection.reason": "rate_limited", "gen_ai.request.model": "m"})


def _lines(prometheus: PrometheusMetrics, accept: str | None) -> list[str]:
    body, _ = prometheus.render(accept)
    # target_info carries a random service.instance.id (and is there only while the SDK
    # has data); everything else must match.
    return sorted(_normalized(line) for line in body.decode().splitlines() if not TARGET_INFO.match(line))


def _normalized(line: str) -> str:
    """Label order within a series is not significant."""
    if "{" not in line or line.startswith("#"):
        return line
    name, rest = line.split("{", 1)
    labels, value = rest.rsplit("} ", 1)
    return f"{name}{{{','.join(sorted(labels.split(',')))}}} {value}"


@pytest.mark.parametrize("accept", [None, OPENMETRICS])
def test_export_matches_the_opentelemetry_exporter(accept: str | None) -> None:
    through_sdk = PrometheusMetrics(process_metrics=False)
    sdk_metrics = RouterMetrics(through_sdk.meter_provider)
    local = PrometheusMetrics(process_metrics=False)
    local_metrics = RouterMetrics(local.meter_provider, local=local.local)
    assert isinstance(local_metrics.operation_duration, LocalHistogram)
    assert isinstance(local_metrics.attempts, LocalCounter)
    assert not isinstance(sdk_metrics.operation_duration, LocalHistogram)
    assert not [
        line for line in _lines(local, accept) if not line.startswith("# EOF")
    ]  # nothing recorded yet
    _record_everything(sdk_metrics)
    _record_everything(local_metrics)
    expected = _lines(through_sdk, accept)
    assert len(expected) > 100
    for family in (
        "gen_ai_client_operation_time_per_output_chunk_seconds",
        "llmrouter_cost",
        "llmrouter_retries",
    ):
        assert any(line.startswith(family) for line in expected)
    assert _lines(local, accept) == expected


@pytest.mark.parametrize("wrapper", [_AsPairs, _Bound], ids=["attributes as pairs", "bound instruments"])
@pytest.mark.parametrize("through", ["local", "sdk", "both"])
def test_pairs_and_bound_instruments_make_the_same_series_as_mappings(wrapper: Any, through: str) -> None:
    through_sdk = PrometheusMetrics(process_metrics=False)
    sdk_metrics = RouterMetrics(through_sdk.meter_provider)
    local = PrometheusMetrics(process_metrics=False)
    local_metrics = RouterMetrics(local.meter_provider, local=local.local)
    _record_everything(wrapper(sdk_metrics) if through in ("sdk", "both") else sdk_metrics)
    _record_everything(wrapper(local_metrics) if through in ("local", "both") else local_metrics)
    assert _lines(local, None) == _lines(through_sdk, None)


def test_bound_histogram_folds_into_the_series_and_drops_invalid_values() -> None:
    histogram = LocalHistogram("h", "s", "", CHUNK_BUCKETS)
    record = histogram.bind(tuple(ATTRIBUTES.items()))
    assert histogram.bind(ATTRIBUTES) == record  # a mapping binds the same series
    for value in [*VALUES, -1.0, math.nan, math.inf]:
        record(value)
    histogram.record(0.002, ATTRIBUTES)  # recorded directly too: one series
    ((_, counts, total),) = histogram.collect()
    assert sum(counts) == len(VALUES) + 1 and total == pytest.approx(sum(VALUES) + 0.002)
    # Folded once: collecting again counts nothing twice, and later observations add up.
    assert histogram.collect() == [(ATTRIBUTES, counts, total)]
    record(30.0)
    ((_, counts, _),) = histogram.collect()
    assert sum(counts) == len(VALUES) + 2 and counts[-1] == 3


def test_bound_counter_keeps_integer_sums_and_drops_invalid_amounts() -> None:
    counter = LocalCounter("c", "{request}", "")
    add = counter.bind({"a": "x"})
    for amount in (1, 2, 3):
        add(amount)
    counter.add(4, {"a": "x"})
    [(attributes, value)] = counter.collect()
    assert attributes == {"a": "x"} and value == 10 and isinstance(value, int)
    for amount in (0.5, -3, math.nan, math.inf, 0.25):
        add(amount)
    assert counter.collect() == [({"a": "x"}, 10.75)]


@pytest.mark.anyio
async def test_the_service_folds_bound_instruments_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmrouter.telemetry import extension as telemetry_extension
    from llmrouter.telemetry.config import TelemetryConfig

    monkeypatch.setattr(telemetry_extension, "FOLD_SECONDS", 0.01)
    ext = telemetry_extension.TelemetryExtension(TelemetryConfig(json_logs=False))
    assert ext.prometheus is not None
    local = ext.prometheus.local
    record = ext.metrics.operation_duration.bind(tuple(ATTRIBUTES.items()))
    record(0.5)
    folds: list[None] = []
    fold = local.fold
    monkeypatch.setattr(local, "fold", lambda: (folds.append(None), fold())[1])
    await ext.startup()
    try:
        for _ in range(200):
            if len(folds) >= 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await ext.shutdown()
    assert len(folds) >= 2
    assert ext.metrics.operation_duration._waiting._lists[tuple(ATTRIBUTES.items())] == []
    count = len(folds)
    await asyncio.sleep(0.05)
    assert len(folds) == count  # stopped at shutdown


def test_a_bound_instrument_given_something_else_than_a_number_records_the_numbers() -> None:
    # record() would refuse them; a bound instrument appends them, and the fold drops them.
    histogram = LocalHistogram("h", "s", "", CHUNK_BUCKETS)
    counter = LocalCounter("c", "{request}", "")
    for bound in (histogram.bind(ATTRIBUTES), counter.bind(ATTRIBUTES)):
        for amount in (None, 0.5, "x", 2):
            bound(amount)  # type: ignore[arg-type]
    ((_, counts, total),) = histogram.collect()
    assert sum(counts) == 2 and total == 2.5
    assert counter.collect() == [(ATTRIBUTES, 2.5)]
    only_text = LocalHistogram("h", "s", "", CHUNK_BUCKETS)
    only_text.bind(ATTRIBUTES)("x")  # type: ignore[arg-type]
    assert only_text.collect() == []  # no empty series left behind


def test_a_cache_of_bound_instruments_starts_again_when_full() -> None:
    histogram = LocalHistogram("h", "s", "", [1.0])
    cache: dict[int, Any] = {}
    for label in range(BOUND_MEMORY):
        assert keep_bound(cache, label, histogram.bind((("n", label),))) is cache[label]
    keep_bound(cache, -1, histogram.bind((("n", -1),)))
    assert list(cache) == [-1]
    # Binding an evicted label set again records into the same series.
    keep_bound(cache, 0, histogram.bind((("n", 0),)))(0.5)
    histogram.bind((("n", 0),))(0.5)
    assert [(attributes, counts) for attributes, counts, _ in histogram.collect()] == [({"n": 0}, [2, 0])]
