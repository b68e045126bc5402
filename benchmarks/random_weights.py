"""A model directory with another model's architecture and tokenizer, and random weights.

Usage::

    .venv/bin/python benchmarks/random_weights.py SOURCE_DIR TARGET_DIR [--dtype bfloat16]

Throughput and time to first token depend on a model's shape, not on its weights, so a
random-weight copy measures the same as the real model where the real weights cannot
go (a lent GPU machine takes 64 MiB a call; SmolLM2-135M's weights are 269 MB, its
config and tokenizer 3.5 MB). ``SOURCE_DIR`` needs only ``config.json`` and the
tokenizer's files; the chat template and generation config are copied when present.
docs/benchmarks.md's CUDA tables were measured on such a copy of the embedded SmolLM2
(``~/.cache/llmrouter/models/smollm2-135m-instruct-*``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def build(source: Path, target: Path, dtype: str = "bfloat16", seed: int = 0) -> int:
    """Write the copy; returns its number of parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    model = model.to(getattr(torch, dtype))
    model.config.dtype = getattr(torch, dtype)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    for name in ("chat_template.jinja", "generation_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    return sum(parameter.numel() for parameter in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--dtype", default="bfloat16", help="torch dtype of the weights (default bfloat16)")
    args = parser.parse_args()
    count = build(args.source, args.target, args.dtype)
    print(f"{args.target}: {count / 1e6:.1f}M parameters, random {args.dtype} weights")


if __name__ == "__main__":
    main()
