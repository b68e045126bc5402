"""OpenRouter's model list with prices, as a llmrouter price table.

``GET /api/v1/models`` lists every model with ``pricing.prompt`` / ``pricing.completion``
/ ``pricing.input_cache_read`` in USD **per token**, as decimal strings. llmrouter prices
are USD **per million tokens**; the conversion is done in decimal so ``"0.0000025"``
becomes exactly ``2.5``. Models priced ``"-1"`` (variable, e.g. ``openrouter/auto``) are
left out: their cost is only known from the response.

Price table keys are ``openrouter/<id>`` (what :class:`llmrouter.cost.PriceTable` looks up
as ``provider/model`` for a deployment of provider ``openrouter``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import httpx
import msgspec

from llmrouter.config import Price
from llmrouter.errors import UpstreamConnectionError, UpstreamTimeoutError
from llmrouter.openai_compat import error_from_body

__all__ = [
    "ModelPricing",
    "OpenRouterModel",
    "fetch_models",
    "fetch_prices",
    "prices_from_models",
    "write_pricing",
]

_MILLION = Decimal(1_000_000)


class ModelPricing(msgspec.Struct, kw_only=True):
    prompt: str | None = None
    completion: str | None = None
    input_cache_read: str | None = None
    request: str | None = None


class TopProvider(msgspec.Struct, kw_only=True):
    context_length: int | None = None
    max_completion_tokens: int | None = None


class OpenRouterModel(msgspec.Struct, kw_only=True):
    """One entry of ``GET /models`` (the fields llmrouter uses; the rest is ignored)."""

    id: str
    name: str = ""
    created: int = 0
    context_length: int | None = None
    pricing: ModelPricing = msgspec.field(default_factory=ModelPricing)
    top_provider: TopProvider | None = None


class _ModelsPage(msgspec.Struct):
    data: list[OpenRouterModel]


async def fetch_models(
    *,
    base_url: str = "https://openrouter.ai/api/v1",
    api_key: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    http_timeout: float = 30.0,
) -> list[OpenRouterModel]:
    """``GET {base_url}/models`` (the key is optional for this endpoint)."""
    key = api_key or os.environ.get("OPENROUTER_API_KEY")
    headers = {"accept": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    async with httpx.AsyncClient(transport=transport, timeout=http_timeout, trust_env=False) as client:
        try:
            response = await client.get(f"{base_url.rstrip('/')}/models", headers=headers)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(
                f"openrouter: GET /models timed out: {exc}", provider="openrouter"
            ) from exc
        except httpx.HTTPError as exc:
            raise UpstreamConnectionError(
                f"openrouter: GET /models failed: {exc}", provider="openrouter"
            ) from exc
    if response.status_code >= 400:
        raise error_from_body(response.status_code, response.content, response.headers, provider="openrouter")
    try:
        return msgspec.json.decode(response.content, type=_ModelsPage, strict=False).data
    except msgspec.DecodeError as exc:
        raise UpstreamConnectionError(
            f"openrouter: GET /models answered an unexpected body: {exc}", provider="openrouter"
        ) from exc


def _per_million(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        per_token = Decimal(value)
    except (InvalidOperation, ValueError):
        return None
    if per_token < 0:
        return None
    return float(per_token * _MILLION)


def prices_from_models(models: Iterable[OpenRouterModel], *, prefix: str = "openrouter/") -> dict[str, Price]:
    """Price table entries (USD per million tokens) for every model with a fixed price."""
    prices: dict[str, Price] = {}
    for model in models:
        prompt = _per_million(model.pricing.prompt)
        completion = _per_million(model.pricing.completion)
        if prompt is None or completion is None:
            continue
        prices[f"{prefix}{model.id}"] = Price(
            input=prompt, output=completion, cached_input=_per_million(model.pricing.input_cache_read)
        )
    return prices


async def fetch_prices(**kwargs: Any) -> dict[str, Price]:
    """:func:`fetch_models` then :func:`prices_from_models`."""
    return prices_from_models(await fetch_models(**kwargs))


def write_pricing(path: str | Path, prices: Mapping[str, Price], *, merge: bool = True) -> int:
    """Write ``prices`` as a pricing YAML file (``model: {input, output, cached_input}``).

    With ``merge`` (the default), entries already in the file that ``prices`` does not
    name are kept, so hand-written prices survive a refresh. Returns the entry count.
    The file is what ``pricing_file:`` in the config points at.
    """
    import yaml

    target = Path(path)
    existing: dict[str, Any] = {}
    if merge and target.is_file():
        loaded = yaml.safe_load(target.read_text()) or {}
        if isinstance(loaded, dict):
            existing = dict(loaded.get("pricing", loaded))
    for name, price in prices.items():
        existing[name] = {
            key: value for key, value in msgspec.to_builtins(price).items() if value is not None
        }
    header = (
        "# Model prices in USD per million tokens (llmrouter pricing file).\n"
        "# Entries named openrouter/<id> come from OpenRouter's /api/v1/models\n"
        "# (`llmrouter models --provider openrouter --write-pricing FILE`).\n"
    )
    body = yaml.safe_dump(dict(sorted(existing.items())), sort_keys=False, default_flow_style=False)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(header + body)
    tmp.replace(target)
    return len(existing)
