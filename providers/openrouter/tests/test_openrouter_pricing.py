"""OpenRouter's model list as a price table: fetch, convert, write, load back."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from fake_openrouter import MODELS
from llmrouter_openrouter import (
    OpenRouterModel,
    fetch_models,
    fetch_prices,
    prices_from_models,
    write_pricing,
)
from llmrouter_openrouter.cli import cmd_models
from llmrouter_openrouter.pricing import ModelPricing

from llmrouter.config import Price, load_config
from llmrouter.cost import PriceTable
from llmrouter.errors import UpstreamConnectionError

pytestmark = pytest.mark.anyio


async def test_fetch_prices_converts_per_token_strings_to_per_million(openrouter_url: str) -> None:
    prices = await fetch_prices(base_url=openrouter_url)
    assert prices["openrouter/openai/gpt-4o-mini"] == Price(input=0.15, output=0.6, cached_input=0.075)
    assert prices["openrouter/anthropic/claude-3.5-haiku"] == Price(input=0.8, output=4.0)
    assert prices["openrouter/meta-llama/llama-3.2-3b-instruct:free"] == Price(input=0.0, output=0.0)
    # "-1" means variable pricing: only the response knows the cost.
    assert "openrouter/openrouter/auto" not in prices


def test_exact_decimal_conversion() -> None:
    model = OpenRouterModel(id="x/y", pricing=ModelPricing(prompt="0.0000025", completion="0.00001"))
    assert prices_from_models([model]) == {"openrouter/x/y": Price(input=2.5, output=10.0)}


def test_unparseable_prices_are_skipped() -> None:
    models = [OpenRouterModel(id="a/b", pricing=ModelPricing(prompt="n/a", completion="0.1"))]
    assert prices_from_models(models) == {}


async def test_models_endpoint_down_is_a_clear_error(openrouter_url: str) -> None:
    with pytest.raises(UpstreamConnectionError):
        await fetch_models(base_url="http://127.0.0.1:9/api/v1", http_timeout=2)
    models = await fetch_models(base_url=openrouter_url)
    assert [m.id for m in models] == [m["id"] for m in MODELS]
    assert models[0].context_length == 128000


def test_write_pricing_merges_and_loads_as_config(tmp_path: Path) -> None:
    path = tmp_path / "pricing.yaml"
    path.write_text(
        "my-local-model:\n  input: 0.0\n  output: 0.0\nopenrouter/old/model:\n  input: 9\n  output: 9\n"
    )
    prices = {
        "openrouter/openai/gpt-4o-mini": Price(input=0.15, output=0.6, cached_input=0.075),
        "openrouter/old/model": Price(input=1.0, output=2.0),
    }
    assert write_pricing(path, prices) == 3
    config_path = tmp_path / "llmrouter.yaml"
    config_path.write_text("pricing_file: pricing.yaml\n")
    config = load_config(config_path, env={})
    assert config.pricing["openrouter/openai/gpt-4o-mini"] == Price(
        input=0.15, output=0.6, cached_input=0.075
    )
    assert config.pricing["openrouter/old/model"] == Price(input=1.0, output=2.0)
    assert "my-local-model" in config.pricing
    table = PriceTable(config.pricing)
    assert table.lookup(provider="openrouter", model="openai/gpt-4o-mini") == Price(
        input=0.15, output=0.6, cached_input=0.075
    )


def test_cli_table_json_and_write(openrouter_url: str, tmp_path: Path) -> None:
    out = io.StringIO()
    args = argparse.Namespace(base_url=openrouter_url, write_pricing=None, json=False)
    assert cmd_models(args, out) == 0
    table = out.getvalue().splitlines()
    assert table[0].split() == ["model", "context", "$/M", "input", "$/M", "output", "$/M", "cached"]
    assert any(line.split()[:4] == ["openai/gpt-4o-mini", "128000", "0.15", "0.6"] for line in table)
    assert any(line.split()[:3] == ["openrouter/auto", "2000000", "variable"] for line in table)

    out = io.StringIO()
    assert cmd_models(argparse.Namespace(base_url=openrouter_url, write_pricing=None, json=True), out) == 0
    assert json.loads(out.getvalue())["openrouter/anthropic/claude-3.5-haiku"] == {
        "input": 0.8,
        "output": 4.0,
        "cached_input": None,
    }
    target = tmp_path / "pricing.yaml"
    out = io.StringIO()
    assert (
        cmd_models(argparse.Namespace(base_url=openrouter_url, write_pricing=str(target), json=False), out)
        == 0
    )
    assert "wrote 3 OpenRouter prices" in out.getvalue()
    assert "openrouter/openai/gpt-4o-mini:" in target.read_text()
