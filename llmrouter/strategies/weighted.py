"""Weighted random: a deployment is first with probability weight / sum(weights).

The whole order is a weighted random permutation (Efraimidis-Spirakis keys
``u ** (1 / w)``), so retries also follow the weights among those left. The keys are
compared as their logarithms, ``log(u) / w``: ``u ** (1 / w)`` underflows to 0.0 for
small weights (two deployments of weight 1e-6 were picked 99.9% / 0.1%), its logarithm
does not, so only the ratios of the weights matter.

Weight 0 means "only when no deployment of positive weight is left": such deployments
come last, in a uniformly random order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmrouter.deployments import DeploymentState


def weighted(candidates: Sequence[DeploymentState]) -> list[DeploymentState]:
    def key(deployment: DeploymentState) -> tuple[bool, float]:
        weight = deployment.config.weight
        u = 1.0 - random.random()  # in (0, 1]: log(u) is finite
        return (weight > 0, math.log(u) / weight if weight > 0 else u)

    return sorted(candidates, key=key, reverse=True)
