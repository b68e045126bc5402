"""Least busy: fewest requests in flight first; ties broken at random."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmrouter.deployments import DeploymentState


def least_busy(candidates: Sequence[DeploymentState]) -> list[DeploymentState]:
    return sorted(candidates, key=lambda d: (d.in_flight, random.random()))
