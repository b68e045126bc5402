"""Prices and costs: pure functions over :class:`~llmrouter.config.Price` (USD per million tokens)."""

from __future__ import annotations

from collections.abc import Mapping

from llmrouter.config import Price
from llmrouter.types import Usage

__all__ = ["PriceTable", "max_cost", "usage_cost"]

_MILLION = 1_000_000


def usage_cost(usage: Usage, price: Price) -> float:
    """What ``usage`` costs at ``price``; cached prompt tokens at the cached rate if set."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    cached_rate = price.cached_input if price.cached_input is not None else price.input
    fresh = usage.prompt_tokens - cached
    return (fresh * price.input + cached * cached_rate + usage.completion_tokens * price.output) / _MILLION


def max_cost(prompt_tokens: int, max_output_tokens: int, price: Price) -> float:
    """The most a request can cost: every prompt token uncached, the full output used."""
    return (prompt_tokens * price.input + max_output_tokens * price.output) / _MILLION


class PriceTable:
    """Looks up the price of a deployment: its own ``price``, else by ``provider/model``,
    else by upstream model name, else by model group name; None when unpriced (local
    models cost 0 unless priced).

    ``provider/model`` comes first because it is the more specific: the same model id
    costs what its provider charges (``openrouter/anthropic/claude-3.5-haiku``, imported
    from OpenRouter's own list, over the bare ``anthropic/claude-3.5-haiku``)."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self._prices = dict(prices or {})

    def update(self, prices: Mapping[str, Price]) -> None:
        self._prices.update(prices)

    def lookup(
        self, *, provider: str, model: str, group: str | None = None, own: Price | None = None
    ) -> Price | None:
        if own is not None:
            return own
        for name in (f"{provider}/{model}", model, group):
            if name is not None and name in self._prices:
                return self._prices[name]
        return None

    def __contains__(self, name: object) -> bool:
        return name in self._prices

    def __len__(self) -> int:
        return len(self._prices)
