"""Histograms and counters aggregated in process, for the service's own ``/metrics``.

An OpenTelemetry SDK ``record()``/``add()`` costs ~9 us (it copies, validates and hashes
the attributes, builds a measurement, and takes three locks); a request records six or
seven of them and a stream one per chunk, which was most of what metrics cost the
gateway. These instruments do the same aggregation as the SDK's defaults (explicit
buckets: a value goes into the first bucket whose upper bound is ``>=`` it; cumulative
sums; negative or non-finite values are dropped, as the SDK drops them) for ~1 us, and
:class:`~llmrouter.telemetry.prometheus.PrometheusMetrics` exports them with exactly the
series the OpenTelemetry Prometheus exporter writes for the same data
(``tests/telemetry/test_telemetry_local.py`` compares the two line by line).

They only serve the service's Prometheus registry: with a ``MeterProvider`` of your own
(library use, OTLP metrics), :class:`~llmrouter.telemetry.metrics.RouterMetrics` creates
SDK instruments as usual.

Attributes are a mapping or, cheaper, a tuple of ``(name, value)`` pairs (the key a
series is stored under). Instruments are recorded from one thread - the service's
event loop, where the router's hooks, the HTTP middleware and the scrape run - and take
no lock.

The request path records through *bound* instruments: ``bind(attributes)`` returns the
``append`` of a list of observations waiting for that series, a C call (~0.1 us, against
~0.7 us for ``record``: a Python call, a hash of the attributes, a bisection). What is
waiting is added to the series by :meth:`LocalHistogram.fold` - sorted, a bisection per
bucket, see :meth:`LocalHistogram.record_many` - at every collection, and every second
from the service (``TelemetryExtension``), which bounds what waits.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

__all__ = [
    "BOUND_MEMORY",
    "AttributeKey",
    "Attributes",
    "LocalCounter",
    "LocalHistogram",
    "LocalMetrics",
    "Recorder",
    "keep_bound",
]

AttributeKey = tuple[tuple[str, Any], ...]
Attributes = Mapping[str, Any] | AttributeKey
Recorder = Callable[[float], None]
"""A bound instrument: records (or adds) one amount under the attributes it was bound to."""

_K = TypeVar("_K")
_V = TypeVar("_V")

BOUND_MEMORY = 1024
"""How many label sets a cache of bound instruments keeps (see :func:`keep_bound`)."""


def keep_bound(cache: dict[_K, _V], key: _K, bound: _V) -> _V:
    """Store ``bound`` (bound instruments) under ``key`` and return it. Label sets are
    bounded by configuration, but some values are the client's to make up (an HTTP
    method, a model): past :data:`BOUND_MEMORY` the cache starts again. That loses
    nothing, since binding the same attributes again gives the same recorder."""
    if len(cache) >= BOUND_MEMORY:
        cache.clear()
    cache[key] = bound
    return bound


_INF = math.inf


# A series is keyed by its attributes in the caller's order (sorting them for every
# observation cost more than the rest of recording it); collect() merges the series
# that differ only in order. Recording builds the key inline: a call costs as much.
def _canonical(key: AttributeKey) -> AttributeKey:
    return tuple(sorted(key))


def _key(attributes: Attributes | None) -> AttributeKey:
    if attributes.__class__ is tuple:
        return attributes
    return tuple(attributes.items()) if attributes else ()  # type: ignore[union-attr]


class _Waiting:
    """What bound instruments recorded and their instrument has not yet aggregated: a
    list per attribute set (a list: ``array("d").append`` parses its argument by format
    string, ~4x the instructions)."""

    def __init__(self) -> None:
        self._lists: dict[AttributeKey, list[float]] = {}

    def bind(self, attributes: Attributes | None) -> Recorder:
        key = _key(attributes)
        waiting = self._lists.get(key)
        if waiting is None:
            waiting = self._lists[key] = []
        return waiting.append

    def take(self) -> Iterator[tuple[AttributeKey, list[float]]]:
        """Each attribute set's waiting amounts, emptying its list."""
        for key, waiting in self._lists.items():
            if waiting:
                amounts = waiting[:]
                del waiting[:]
                yield key, amounts


def _numbers(amounts: list[Any]) -> list[float]:
    """The numbers among ``amounts``: a bound instrument appends whatever it is given,
    where ``record`` would have raised (the fold then drops what is not a number)."""
    return [amount for amount in amounts if isinstance(amount, int | float)]


class LocalHistogram:
    """An explicit-bucket histogram (the OpenTelemetry ``Histogram`` calls used here)."""

    def __init__(self, name: str, unit: str, description: str, boundaries: Iterable[float]) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.boundaries = tuple(boundaries)
        # attributes -> per-bucket counts (the last bucket: above every boundary), then the sum
        self._series: dict[AttributeKey, list[float]] = {}
        self._waiting = _Waiting()

    def record(self, amount: float, attributes: Attributes | None = None) -> None:
        if 0 <= amount < _INF:  # negative, infinite or NaN: dropped
            key = attributes if attributes.__class__ is tuple else _key(attributes)
            series = self._series.get(key) or self._new_series(key)
            series[bisect_left(self.boundaries, amount)] += 1
            series[-1] += amount

    def record_many(self, amounts: Iterable[float], attributes: Attributes | None = None) -> None:
        """Each of ``amounts`` is one observation with ``attributes`` (a stream's chunk
        gaps). When all are valid they are sorted, and each bucket takes the ones up to
        its bound with one bisection; most gaps fall in the first bucket or two, so this
        usually stops there (a bisection per value cost three times as much)."""
        amounts = sorted(amounts)
        if not amounts:
            return
        total = sum(amounts)
        key = _key(attributes)
        series = self._series.get(key) or self._new_series(key)
        # NaN makes the sum NaN; the sorted ends give the smallest and largest.
        if total == total and amounts[0] >= 0 and amounts[-1] < _INF:
            counted, count = 0, len(amounts)
            for bucket, bound in enumerate(self.boundaries):
                upto = bisect_right(amounts, bound)
                series[bucket] += upto - counted
                counted = upto
                if counted == count:
                    break
            else:
                series[-2] += count - counted  # above every bound
            series[-1] += total
            return
        for amount in amounts:
            if 0 <= amount < _INF:
                series[bisect_left(self.boundaries, amount)] += 1
                series[-1] += amount

    def bind(self, attributes: Attributes | None = None) -> Recorder:
        """``record`` with these attributes, as a C call (see the module's notes)."""
        return self._waiting.bind(attributes)

    def fold(self) -> None:
        """Add what bound instruments recorded to the series."""
        for key, amounts in self._waiting.take():
            try:
                self.record_many(amounts, key)
            except TypeError:  # not all numbers (sorting or summing them failed)
                self.record_many(_numbers(amounts), key)

    def _new_series(self, key: AttributeKey) -> list[float]:
        series = self._series[key] = [0] * (len(self.boundaries) + 1) + [0.0]
        return series

    def collect(self) -> list[tuple[dict[str, Any], list[int], float]]:
        """``(attributes, per-bucket counts, sum)`` for every attribute set recorded."""
        self.fold()
        merged: dict[AttributeKey, list[float]] = {}
        for key, series in list(self._series.items()):
            canonical = _canonical(key)
            seen = merged.get(canonical)
            merged[canonical] = (
                list(series) if seen is None else [a + b for a, b in zip(seen, series, strict=True)]
            )
        return [(dict(key), [int(n) for n in series[:-1]], series[-1]) for key, series in merged.items()]


class LocalCounter:
    """A monotonic sum (the OpenTelemetry ``Counter.add`` call)."""

    def __init__(self, name: str, unit: str, description: str) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self._values: dict[AttributeKey, float] = {}
        self._waiting = _Waiting()

    def add(self, amount: float, attributes: Attributes | None = None) -> None:
        if 0 <= amount < _INF:
            key = attributes if attributes.__class__ is tuple else _key(attributes)
            self._values[key] = self._values.get(key, 0) + amount

    def bind(self, attributes: Attributes | None = None) -> Recorder:
        """``add`` with these attributes, as a C call (see the module's notes)."""
        return self._waiting.bind(attributes)

    def fold(self) -> None:
        """Add what bound instruments added to the sums."""
        for key, amounts in self._waiting.take():
            try:
                total = sum(amounts)
                valid = total < _INF and min(amounts) >= 0  # a NaN makes the sum NaN
            except TypeError:  # not all numbers
                amounts, valid = _numbers(amounts), False
            if valid:
                self._values[key] = self._values.get(key, 0) + total
            else:
                for amount in amounts:
                    self.add(amount, key)

    def collect(self) -> list[tuple[dict[str, Any], float]]:
        self.fold()
        merged: dict[AttributeKey, float] = {}
        for key, value in list(self._values.items()):
            canonical = _canonical(key)
            merged[canonical] = merged.get(canonical, 0) + value
        return [(dict(key), value) for key, value in merged.items()]


class LocalMetrics:
    """The local instruments of one registry, in creation order."""

    def __init__(self) -> None:
        self.instruments: list[LocalHistogram | LocalCounter] = []

    def histogram(
        self, name: str, unit: str, description: str, boundaries: Iterable[float]
    ) -> LocalHistogram:
        histogram = LocalHistogram(name, unit, description, boundaries)
        self.instruments.append(histogram)
        return histogram

    def counter(self, name: str, unit: str, description: str) -> LocalCounter:
        counter = LocalCounter(name, unit, description)
        self.instruments.append(counter)
        return counter

    def fold(self) -> None:
        """Fold every instrument's bound observations into its series (see the module's notes)."""
        for instrument in self.instruments:
            instrument.fold()
