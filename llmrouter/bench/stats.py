"""Percentiles, medians over rounds, and plain-text tables."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["median", "percentile", "render_table", "round_pairs"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    """The median of the values that are numbers: a round whose window ended no request
    has NaN percentiles, and ``statistics.median`` with a NaN among its values answers by
    the rounds' order. NaN when none is a number."""
    numbers = [value for value in values if value == value]
    return statistics.median(numbers) if numbers else float("nan")


def round_pairs(values: Sequence[float | None], bases: Sequence[float | None]) -> list[tuple[float, float]]:
    """Two targets' figures of the same rounds, paired round by round: a target that died
    mid-run has None for the rounds it answered nothing in, and pairing what is left in
    order would set one round's figure against another's. A round either lacks, or whose
    base is 0 (no ratio to it), is left out."""
    return [(value, base) for value, base in zip(values, bases, strict=True) if value is not None and base]


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A right-aligned text table with a header rule."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, rule, *body])
