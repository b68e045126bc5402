"""PriceTable: which entry prices a deployment."""

from llmrouter.config import Price
from llmrouter.cost import PriceTable

LIST_PRICE = Price(input=0.8, output=4.0)
OPENROUTERS = Price(input=1.0, output=5.0)


def test_the_providers_own_entry_wins_over_the_bare_model_id():
    # `llmrouter models --provider openrouter --write-pricing` writes openrouter/<id>; the
    # shipped file's bare <id> used to shadow it, so a refreshed price never took effect.
    table = PriceTable(
        {"anthropic/claude-3.5-haiku": LIST_PRICE, "openrouter/anthropic/claude-3.5-haiku": OPENROUTERS}
    )
    assert table.lookup(provider="openrouter", model="anthropic/claude-3.5-haiku") == OPENROUTERS
    assert table.lookup(provider="remote", model="anthropic/claude-3.5-haiku") == LIST_PRICE


def test_a_deployments_own_price_then_the_group_name():
    table = PriceTable({"fast": LIST_PRICE, "gpt-4o-mini": OPENROUTERS})
    assert table.lookup(provider="openai", model="gpt-4o-mini", group="fast", own=LIST_PRICE) == LIST_PRICE
    assert table.lookup(provider="vllm", model="llama", group="fast") == LIST_PRICE
    assert table.lookup(provider="vllm", model="llama") is None
