"""benchmarks/random_weights.py: a model with another's shape and tokenizer, new weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmrouter.testing.tiny_models import build_tiny_llama  # noqa: E402

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "random_weights.py"


def test_the_copy_has_the_shape_and_tokenizer_but_not_the_weights(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("random_weights", SCRIPT)
    assert spec is not None and spec.loader is not None
    random_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(random_weights)
    source = build_tiny_llama(tmp_path / "source")
    count = random_weights.build(source, tmp_path / "copy", "float32", seed=1)

    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    copy = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    assert count == sum(p.numel() for p in original.parameters()) == sum(p.numel() for p in copy.parameters())
    shapes = {name: tuple(p.shape) for name, p in original.named_parameters()}
    assert {name: tuple(p.shape) for name, p in copy.named_parameters()} == shapes
    weights = dict(copy.named_parameters())
    assert any(not torch.equal(p, weights[name]) for name, p in original.named_parameters())
    text = "Hello there 😀"
    assert (
        transformers.AutoTokenizer.from_pretrained(tmp_path / "copy")(text)["input_ids"]
        == transformers.AutoTokenizer.from_pretrained(source)(text)["input_ids"]
    )
    assert (tmp_path / "copy" / "chat_template.jinja").is_file() == (source / "chat_template.jinja").is_file()
