"""Ordered priority: lowest ``priority`` first, then the order of the config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmrouter.deployments import DeploymentState


def priority(candidates: Sequence[DeploymentState]) -> list[DeploymentState]:
    return sorted(candidates, key=lambda d: (d.config.priority, d.index))
