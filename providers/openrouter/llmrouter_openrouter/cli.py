"""``llmrouter models --provider openrouter``: OpenRouter's models with prices.

Wired into the ``llmrouter`` command by :func:`add_arguments` / :func:`cmd_models`, and
runnable on its own as ``python -m llmrouter_openrouter.cli [--write-pricing FILE]``::

    llmrouter models --provider openrouter                       # table: id, context, $/M in, $/M out
    llmrouter models --provider openrouter --json                # the price table as JSON
    llmrouter models --provider openrouter --write-pricing config/pricing.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

import anyio
import msgspec

from llmrouter.errors import LLMRouterError
from llmrouter_openrouter.pricing import OpenRouterModel, fetch_models, prices_from_models, write_pricing
from llmrouter_openrouter.provider import DEFAULT_BASE_URL

__all__ = ["add_arguments", "cmd_models", "main", "register"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The OpenRouter options of ``llmrouter models`` (``--write-pricing``, ``--json``, ``--base-url``)."""
    parser.add_argument(
        "--write-pricing",
        metavar="FILE",
        help="merge OpenRouter's prices into this pricing YAML file (see pricing_file: in the config)",
    )
    parser.add_argument("--json", action="store_true", help="print the price table as JSON")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help=argparse.SUPPRESS)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``openrouter-models`` to a CLI's sub-commands (sets ``func``)."""
    parser = subparsers.add_parser(
        "openrouter-models", help="OpenRouter's models with prices; import them as a price table"
    )
    add_arguments(parser)
    parser.set_defaults(func=cmd_models)


def _price(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _print_table(models: list[OpenRouterModel], out: TextIO) -> None:
    prices = prices_from_models(models)
    rows = [["model", "context", "$/M input", "$/M output", "$/M cached"]]
    for model in sorted(models, key=lambda m: m.id):
        price = prices.get(f"openrouter/{model.id}")
        context = str(model.context_length or "-")
        if price is None:
            rows.append([model.id, context, "variable", "variable", "-"])
        else:
            rows.append(
                [model.id, context, _price(price.input), _price(price.output), _price(price.cached_input)]
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n"
        )


def cmd_models(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """List OpenRouter's models with prices; with ``--write-pricing FILE`` import them."""
    out = out or sys.stdout
    try:
        models = anyio.run(lambda: fetch_models(base_url=args.base_url))
    except LLMRouterError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    prices = prices_from_models(models)
    if getattr(args, "write_pricing", None):
        total = write_pricing(args.write_pricing, prices)
        print(
            f"wrote {len(prices)} OpenRouter prices to {args.write_pricing} ({total} entries in the file)",
            file=out,
        )
        return 0
    if getattr(args, "json", False):
        json.dump({name: msgspec.to_builtins(price) for name, price in prices.items()}, out, indent=2)
        out.write("\n")
        return 0
    _print_table(models, out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmrouter_openrouter.cli", description=cmd_models.__doc__
    )
    add_arguments(parser)
    return cmd_models(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
