"""The instruments llmrouter records, named after the OpenTelemetry semantic conventions.

GenAI client metrics (``gen_ai.*``) follow the GenAI semantic conventions; the HTTP
server duration follows the HTTP ones; llmrouter's own are under ``llmrouter.*``.
Attributes are bounded by configuration (model groups, deployments, API keys, error
classes) - never request ids, prompts or raw client-supplied strings.

Instruments come from ``metrics.get_meter("llmrouter", meter_provider=...)``: with no
``meter_provider`` they use the global one, so a library user's own SDK set-up (any
exporter) is honoured, even when it is installed after the router was built.

Prometheus names, as the OpenTelemetry Prometheus exporter writes them::

    gen_ai_client_token_usage_bucket{gen_ai_token_type="input"|"output", ...}
    gen_ai_client_operation_duration_seconds_bucket
    gen_ai_client_operation_time_to_first_chunk_seconds_bucket
    gen_ai_client_operation_time_per_output_chunk_seconds_bucket
    http_server_request_duration_seconds_bucket
    llmrouter_cost_total, llmrouter_cache_requests_total, llmrouter_retries_total,
    llmrouter_fallbacks_total, llmrouter_deployment_attempts_total,
    llmrouter_deployment_cooldowns_total, llmrouter_requests_rejected_total,
    llmrouter_deployment_in_flight, llmrouter_budget_spent, llmrouter_budget_limit,
    llmrouter_ledger_pending, llmrouter_accounting_settlements_waiting
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from llmrouter.extension import Gauge
from llmrouter.telemetry.local import Attributes, LocalHistogram, LocalMetrics, Recorder

__all__ = [
    "CHUNK_BUCKETS",
    "DURATION_BUCKETS",
    "HTTP_DURATION_BUCKETS",
    "OFFERED_GAUGES",
    "TOKEN_BUCKETS",
    "TTFT_BUCKETS",
    "RouterMetrics",
]

DURATION_BUCKETS: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)  # fmt: skip
"""``gen_ai.client.operation.duration`` advice from the GenAI semantic conventions."""

TOKEN_BUCKETS: tuple[int, ...] = tuple(4**i for i in range(14))
"""``gen_ai.client.token.usage`` advice: 1, 4, 16, ... 67108864."""

TTFT_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)  # fmt: skip
"""Time to first chunk: the conventions' server TTFT advice, stretched for cold local models."""

CHUNK_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)  # fmt: skip
"""Time per output chunk: the conventions' time-per-output-token advice, plus sub-10 ms
buckets for fast upstreams."""

HTTP_DURATION_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)  # fmt: skip
"""The HTTP conventions' advice stops at 10 s; LLM answers and streams run for minutes."""

InFlightSource = Callable[[], Mapping[str, int]]
EngineSource = Callable[[], Mapping[str, dict[str, Any]]]

OFFERED_GAUGES: dict[str, tuple[str, str]] = {
    "llmrouter.budget.spent": (
        "{USD}",
        "Spend in each budget window (key, period, model), as this process last saw it.",
    ),
    "llmrouter.budget.limit": ("{USD}", "The limit of each budget window (key, period, model)."),
    "llmrouter.ledger.pending": ("{row}", "Ledger rows acknowledged but not yet in the database."),
    "llmrouter.accounting.settlements_waiting": (
        "{settlement}",
        "Budget settlements and rate-limit releases waiting for their store to answer.",
    ),
}
"""The gauges other components may offer (:meth:`RouterMetrics.add_gauge`): unit and
description, by name."""


class _SDKInstrument:
    """An OpenTelemetry SDK histogram or counter that also takes its attributes as a
    tuple of ``(name, value)`` pairs, as local instruments do (see
    :mod:`llmrouter.telemetry.local`): the hooks build them that way."""

    __slots__ = ("instrument",)

    def __init__(self, instrument: Any) -> None:
        self.instrument = instrument

    def record(self, amount: float, attributes: Attributes | None = None) -> None:
        self.instrument.record(amount, _mapping(attributes))

    def add(self, amount: float, attributes: Attributes | None = None) -> None:
        self.instrument.add(amount, _mapping(attributes))

    def bind(self, attributes: Attributes | None = None) -> Recorder:
        """``record`` or ``add`` (whichever the instrument has) with these attributes."""
        method = getattr(self.instrument, "record", None) or self.instrument.add
        return partial(method, attributes=_mapping(attributes))


def _mapping(attributes: Attributes | None) -> Mapping[str, Any] | None:
    return dict(attributes) if isinstance(attributes, tuple) else attributes


class RouterMetrics:
    """Creates and holds llmrouter's instruments on one meter.

    Histograms and counters take attributes as a mapping or as a tuple of
    ``(name, value)`` pairs (cheaper for the in-process ones).

    Args:
        meter_provider: where to create them; None uses the global MeterProvider.
        local: create the histograms and counters here instead (aggregated in process,
            exported by the service's Prometheus registry, see
            :mod:`llmrouter.telemetry.local`); the observable gauges stay on the meter.
    """

    def __init__(
        self,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        local: LocalMetrics | None = None,
    ) -> None:
        meter = metrics.get_meter("llmrouter", _version(), meter_provider=meter_provider)
        self.local = local

        def histogram(name: str, unit: str, description: str, buckets: Sequence[float]) -> Any:
            if local is not None:
                return local.histogram(name, unit, description, buckets)
            return _SDKInstrument(
                meter.create_histogram(
                    name, unit=unit, description=description, explicit_bucket_boundaries_advisory=buckets
                )
            )

        def counter(name: str, unit: str, description: str) -> Any:
            if local is not None:
                return local.counter(name, unit, description)
            return _SDKInstrument(meter.create_counter(name, unit=unit, description=description))

        self.token_usage = histogram(
            "gen_ai.client.token.usage", "{token}", "Number of input and output tokens used.", TOKEN_BUCKETS
        )
        self.operation_duration = histogram(
            "gen_ai.client.operation.duration", "s", "GenAI operation duration.", DURATION_BUCKETS
        )
        self.time_to_first_chunk = histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            "s",
            "Time to receive the first chunk of a streamed response.",
            TTFT_BUCKETS,
        )
        self.time_per_output_chunk = histogram(
            "gen_ai.client.operation.time_per_output_chunk",
            "s",
            "Time per output chunk, for each chunk after the first one.",
            CHUNK_BUCKETS,
        )
        self.http_server_duration = histogram(
            "http.server.request.duration", "s", "Duration of HTTP server requests.", HTTP_DURATION_BUCKETS
        )
        self.cost = counter(
            "llmrouter.cost", "{USD}", "Cost of requests in US dollars, by API key and model."
        )
        self.cache_requests = counter(
            "llmrouter.cache.requests", "{request}", "Cache lookups by result (hit, miss, coalesced, bypass)."
        )
        self.retries = counter("llmrouter.retries", "{attempt}", "Attempts after the first one of a request.")
        self.fallbacks = counter("llmrouter.fallbacks", "{fallback}", "Moves to a fallback model group.")
        self.attempts = counter(
            "llmrouter.deployment.attempts",
            "{attempt}",
            "Attempts on a deployment, by outcome (ok, error, cancelled) and error type.",
        )
        self.cooldowns = counter(
            "llmrouter.deployment.cooldowns", "{cooldown}", "Times a deployment was taken out of rotation."
        )
        self.rejected = counter(
            "llmrouter.requests.rejected",
            "{request}",
            "Requests refused before dispatch (rate limits, budgets, auth).",
        )
        self._sources: list[InFlightSource] = []
        self._seen_deployments: set[str] = set()
        self._lock = threading.Lock()
        meter.create_observable_gauge(
            "llmrouter.deployment.in_flight",
            callbacks=[self._observe_in_flight],
            unit="{request}",
            description="Requests being served by each deployment.",
        )
        self._engine_sources: list[EngineSource] = []
        meter.create_observable_gauge(
            "llmrouter.engine.requests",
            callbacks=[self._observe_engine_requests],
            unit="{request}",
            description="Requests in an in-process engine's scheduler (vLLM), by state.",
        )
        meter.create_observable_gauge(
            "llmrouter.engine.kv_cache.usage",
            callbacks=[self._observe_kv_cache],
            unit="1",
            description="Fraction of an in-process engine's KV cache in use (vLLM).",
        )
        # Gauges other components offer (Extension.gauges): read from them at collection.
        self._gauges: dict[str, list[Gauge]] = {name: [] for name in OFFERED_GAUGES}
        for name, (unit, description) in OFFERED_GAUGES.items():
            meter.create_observable_gauge(
                name, callbacks=[partial(self._observe_offered, name)], unit=unit, description=description
            )

    def fold(self) -> None:
        """Fold what bound local instruments recorded into their series (see
        :mod:`llmrouter.telemetry.local`); nothing to do for SDK instruments."""
        if self.local is not None:
            self.local.fold()

    def record_chunk_times(self, values: Iterable[float], attributes: Attributes) -> None:
        """One ``time_per_output_chunk`` observation per value (a stream's chunk gaps)."""
        if isinstance(self.time_per_output_chunk, LocalHistogram):
            self.time_per_output_chunk.record_many(values, attributes)
            return
        record, mapping = self.time_per_output_chunk.instrument.record, _mapping(attributes)
        for value in values:
            record(value, mapping)

    def add_engine_source(self, source: EngineSource) -> None:
        """Register a callable returning ``{deployment: engine_stats()}`` of in-process
        engines (vLLM): scheduler queue and KV-cache use, read at collection."""
        with self._lock:
            self._engine_sources.append(source)

    def _engine_stats(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            sources = list(self._engine_sources)
        stats: dict[str, dict[str, Any]] = {}
        for source in sources:
            stats.update(source())
        return stats

    def _observe_engine_requests(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(value, {"llmrouter.deployment": deployment, "llmrouter.engine.state": state})
            for deployment, stats in self._engine_stats().items()
            for state in ("running", "waiting")
            if isinstance(value := stats.get(f"requests_{state}"), int | float)
        ]

    def _observe_kv_cache(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(value, {"llmrouter.deployment": deployment})
            for deployment, stats in self._engine_stats().items()
            if isinstance(value := stats.get("kv_cache_usage"), int | float)
        ]

    def add_gauge(self, name: str, gauge: Gauge) -> bool:
        """Export ``gauge``'s values as the gauge ``name``, if it is one of
        :data:`OFFERED_GAUGES` (True); others are not exported (False)."""
        if name not in self._gauges:
            return False
        with self._lock:
            self._gauges[name].append(gauge)
        return True

    def _observe_offered(self, name: str, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            gauges = list(self._gauges[name])
        return [Observation(value, dict(attributes)) for gauge in gauges for attributes, value in gauge()]

    def add_in_flight_source(self, source: InFlightSource) -> None:
        """Register a callable returning ``{deployment: in_flight}``; summed at collection."""
        with self._lock:
            self._sources.append(source)

    def _observe_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[str, int] = {}
        with self._lock:
            sources = list(self._sources)
        for source in sources:
            for deployment, count in source().items():
                totals[deployment] = totals.get(deployment, 0) + count
        with self._lock:
            # A deployment that went idle reports 0 rather than vanishing: a vanished
            # series keeps its last value in Prometheus for five minutes.
            self._seen_deployments.update(totals)
            seen = sorted(self._seen_deployments)
        return [Observation(totals.get(name, 0), {"llmrouter.deployment": name}) for name in seen]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmrouter")
    except PackageNotFoundError:
        return "0"
