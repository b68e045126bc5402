"""Lowest latency: smallest EWMA of time-to-first-token (then of duration) first.

Deployments not yet measured come first, so every deployment gets measured; ties are
broken at random so equal deployments share the load.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmrouter.deployments import DeploymentState


def lowest_latency(candidates: Sequence[DeploymentState]) -> list[DeploymentState]:
    def key(d: DeploymentState) -> tuple[float, float, float]:
        if d.ewma_ttft is None:
            return (-1.0, 0.0, random.random())
        return (d.ewma_ttft, d.ewma_duration or 0.0, random.random())

    return sorted(candidates, key=key)
