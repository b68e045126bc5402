"""Weighted random: a deployment is first with probability weight / sum(weights).

The whole order is a weighted random permutation (Efraimidis-Spirakis keys
``u ** (1 / w)``), so retries also follow the weights among those left.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmrouter.deployments import DeploymentState


def weighted(candidates: Sequence[DeploymentState]) -> list[DeploymentState]:
    def key(deployment: DeploymentState) -> float:
        weight = deployment.config.weight
        return random.random() ** (1.0 / weight) if weight > 0 else -1.0

    return sorted(candidates, key=key, reverse=True)
