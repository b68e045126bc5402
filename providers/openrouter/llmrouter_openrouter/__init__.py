"""llmrouter-openrouter: OpenRouter's models through llmrouter, with the cost OpenRouter reports.

Install with ``pip install 'llmrouter[openrouter]'``; the provider registers itself under
the entry point ``openrouter``. See docs/providers/openrouter.md.
"""

from llmrouter_openrouter.pricing import (
    OpenRouterModel,
    fetch_models,
    fetch_prices,
    prices_from_models,
    write_pricing,
)
from llmrouter_openrouter.provider import API_KEY_ENV, DEFAULT_BASE_URL, OpenRouterOptions, OpenRouterProvider

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_BASE_URL",
    "OpenRouterModel",
    "OpenRouterOptions",
    "OpenRouterProvider",
    "fetch_models",
    "fetch_prices",
    "prices_from_models",
    "write_pricing",
]
