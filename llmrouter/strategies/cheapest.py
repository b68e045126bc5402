"""Cheapest: lowest price (input + output per million tokens) first.

Unpriced deployments count as free (local models cost 0 unless priced); ties keep
the config order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmrouter.deployments import DeploymentState


def cheapest(candidates: Sequence[DeploymentState]) -> list[DeploymentState]:
    def key(d: DeploymentState) -> tuple[float, int]:
        price = d.price
        return ((price.input + price.output) if price else 0.0, d.index)

    return sorted(candidates, key=key)
