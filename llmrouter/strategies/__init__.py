"""Deployment selection strategies, one per module.

A strategy orders a group's available deployments, most preferred first; the router
tries them in that order, so the order also decides where retries go.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from llmrouter.strategies.cheapest import cheapest
from llmrouter.strategies.least_busy import least_busy
from llmrouter.strategies.lowest_latency import lowest_latency
from llmrouter.strategies.priority import priority
from llmrouter.strategies.weighted import weighted

if TYPE_CHECKING:
    from llmrouter.deployments import DeploymentState

__all__ = ["STRATEGIES", "Strategy", "get_strategy"]

Strategy = Callable[[Sequence["DeploymentState"]], list["DeploymentState"]]

STRATEGIES: dict[str, Strategy] = {
    "priority": priority,
    "weighted": weighted,
    "least_busy": least_busy,
    "lowest_latency": lowest_latency,
    "cheapest": cheapest,
}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})") from None
