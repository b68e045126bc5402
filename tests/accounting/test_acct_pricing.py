"""config/pricing.yaml loads into the price table; local models stay unpriced (cost 0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmrouter.config import parse_config
from llmrouter.cost import PriceTable, max_cost, usage_cost
from llmrouter.types import PromptTokensDetails, Usage

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


def test_pricing_file_loads_and_prices_requests() -> None:
    config = parse_config(
        {"pricing_file": "pricing.yaml", "pricing": {"gpt-4o": {"input": 2.0, "output": 9.0}}},
        env={},
        base_dir=CONFIG_DIR,
    )
    table = PriceTable(config.pricing)
    assert config.pricing["gpt-4o"].input == 2.0  # the main config wins over the file
    mini = table.lookup(provider="openai", model="gpt-4o-mini")
    assert mini is not None and (mini.input, mini.output, mini.cached_input) == (0.15, 0.60, 0.075)
    usage = Usage(
        prompt_tokens=1_000,
        completion_tokens=500,
        total_tokens=1_500,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=400),
    )
    assert usage_cost(usage, mini) == pytest.approx((600 * 0.15 + 400 * 0.075 + 500 * 0.60) / 1e6)
    assert max_cost(1_000, 500, mini) >= usage_cost(usage, mini)
    assert table.lookup(provider="openrouter", model="anthropic/claude-3.5-sonnet") is not None
    assert table.lookup(provider="transformers", model="SmolLM2-135M-Instruct") is None  # local: unpriced
    for name, price in config.pricing.items():
        assert price.input >= 0 and price.output >= price.input * 0.5, name
