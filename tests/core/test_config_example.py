"""config/llmrouter.example.yaml loads, and documents every key of the config."""

import re
import typing
from pathlib import Path

import msgspec
import yaml

from llmrouter.config import Config, parse_config
from llmrouter.registry import load_provider_class

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "llmrouter.example.yaml"


def _field_names(struct: type, seen: set[type]) -> set[str]:
    names: set[str] = set()
    for field in msgspec.structs.fields(struct):
        names.add(field.encode_name)
        for arg in typing.get_args(field.type) or (field.type,):
            for inner in typing.get_args(arg) or (arg,):
                if isinstance(inner, type) and issubclass(inner, msgspec.Struct) and inner not in seen:
                    names |= _field_names(inner, seen | {inner})
    return names


def test_example_config_parses():
    config = parse_config(yaml.safe_load(EXAMPLE.read_text()), env={}, base_dir=EXAMPLE.parent)
    assert config.models[0].name == "mock-gpt"
    assert "gpt-4o" in config.pricing, "pricing_file is merged"


def test_every_key_is_documented():
    text = EXAMPLE.read_text()
    documented = set(re.findall(r"([A-Za-z_]+):", text))
    names = _field_names(Config, {Config}) - {"options"}
    for provider in ("remote", "transformers", "ollama", "openrouter"):
        names |= {f.encode_name for f in msgspec.structs.fields(load_provider_class(provider).Options)}
    assert sorted(names - documented) == []
