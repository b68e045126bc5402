"""Provider discovery through entry points (group ``llmrouter.providers``).

Entry points are read once and the provider classes imported only when first used,
so ``import llmrouter`` stays light. A provider that llmrouter knows but that is not
installed fails with :class:`~llmrouter.errors.ProviderNotInstalledError` naming the
extra to install. Classes can also be registered in code (tests, embedded use).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

from llmrouter.errors import ConfigError, ProviderNotInstalledError
from llmrouter.provider import Provider

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

__all__ = [
    "KNOWN_PROVIDERS",
    "available_providers",
    "create_provider",
    "load_provider_class",
    "register_provider",
]

GROUP = "llmrouter.providers"

KNOWN_PROVIDERS: dict[str, str] = {
    "remote": "llmrouter-remote (pip install 'llmrouter[remote]')",
    "transformers": "llmrouter-transformers (pip install 'llmrouter[transformers]')",
    "vllm": "llmrouter-vllm (pip install 'llmrouter[vllm]')",
    "ollama": "llmrouter-ollama (pip install 'llmrouter[ollama]')",
    "openrouter": "llmrouter-openrouter (pip install 'llmrouter[openrouter]')",
}
"""Providers with a first-party distribution, and how to install each."""

_registered: dict[str, type[Provider[Any]]] = {}


@cache
def _entry_points() -> dict[str, EntryPoint]:
    # Imported here: importlib.metadata (and the email and zipfile modules it pulls in)
    # was a fifth of what ``import llmrouter`` cost, and only a router being built needs it.
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=GROUP)}


def register_provider(name: str, cls: type[Provider[Any]]) -> None:
    """Make ``cls`` available under ``name`` without an entry point."""
    _registered[name] = cls


def available_providers() -> list[str]:
    """Names of every provider that can be loaded here."""
    return sorted({*_entry_points(), *_registered})


def load_provider_class(name: str) -> type[Provider[Any]]:
    """Import and return the provider class registered under ``name``."""
    if name in _registered:
        return _registered[name]
    entry = _entry_points().get(name)
    if entry is None:
        if name in KNOWN_PROVIDERS:
            raise ProviderNotInstalledError(
                f"provider {name!r} is not installed: install {KNOWN_PROVIDERS[name]}"
            )
        known = ", ".join(available_providers()) or "none"
        raise ConfigError(f"unknown provider {name!r} (installed: {known})")
    cls = entry.load()
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise ConfigError(f"entry point {name!r} ({entry.value}) is not a Provider subclass")
    _registered[name] = cls
    return cls


def create_provider(
    name: str, model: str, options: Mapping[str, Any] | None = None, *, path: str = ""
) -> Provider[Any]:
    """Build a provider instance for one deployment from its config keys."""
    return load_provider_class(name).from_config(model, options, path=path)
