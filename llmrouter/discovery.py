"""Zero-config start: ask every installed provider what it can serve.

With no ``models`` in the config and ``discover: true``, ``llmrouter serve`` calls each
available provider class's :meth:`~llmrouter.provider.Provider.discover` concurrently,
each under a short deadline, and registers the model groups they return. The summary
lines say what was found and what was not (including known providers that are not
installed, with the command that installs them)::

    transformers: SmolLM2-135M-Instruct (embedded, CPU)
    ollama: no daemon at 127.0.0.1:11434
    vllm: not installed (llmrouter-vllm (pip install 'llmrouter[vllm]'))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio
import msgspec

from llmrouter.config import Config, ModelGroup
from llmrouter.registry import KNOWN_PROVIDERS, available_providers, load_provider_class

__all__ = ["DiscoveryReport", "describe_config", "discover_models", "resolve_config"]

logger = logging.getLogger("llmrouter.discovery")

DEFAULT_TIMEOUT_S = 5.0
"""Deadline for each provider's ``discover()``; providers probe with shorter ones."""


@dataclass(slots=True)
class DiscoveryReport:
    """The model groups found, and one line per provider saying what happened."""

    groups: list[ModelGroup] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


async def _discover_one(name: str, deadline_s: float) -> tuple[list[ModelGroup], str]:
    try:
        cls = load_provider_class(name)
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the server
        return [], f"{name}: cannot load ({exc})"
    try:
        with anyio.fail_after(deadline_s):
            groups = list(await cls.discover())
    except TimeoutError:
        return [], f"{name}: discovery timed out after {deadline_s:g}s"
    except Exception as exc:
        logger.debug("discovery of %s failed", name, exc_info=True)
        return [], f"{name}: discovery failed ({type(exc).__name__}: {exc})"
    note = cls.discovery_note()
    if not note:
        if groups:
            note = f"{name}: found " + ", ".join(group.name for group in groups)
        else:
            note = f"{name}: nothing found"
    return groups, note


async def discover_models(
    providers: list[str] | None = None, *, deadline_s: float = DEFAULT_TIMEOUT_S
) -> DiscoveryReport:
    """Run ``discover()`` of every available provider (or of ``providers``) concurrently.

    Known first-party providers that are not installed get a line naming what to install.

    Group names must be unique: a later provider's group with a name (or alias) already
    taken is left out, and a line says so.
    """
    names = available_providers() if providers is None else list(providers)
    results: dict[str, tuple[list[ModelGroup], str]] = {}

    async def run(name: str) -> None:
        results[name] = await _discover_one(name, deadline_s)

    async with anyio.create_task_group() as group:
        for name in names:
            group.start_soon(run, name)

    report = DiscoveryReport()
    taken: set[str] = set()
    for name in names:
        groups, note = results[name]
        report.lines.append(note)
        for model_group in groups:
            labels = {model_group.name, *model_group.aliases}
            if labels & taken:
                report.lines.append(f"{name}: skipped {model_group.name!r}, the name is already taken")
                continue
            taken |= labels
            report.groups.append(model_group)
    installed = set(available_providers())
    for name, install in KNOWN_PROVIDERS.items():
        if name not in installed:
            report.lines.append(f"{name}: not installed (install {install})")
    return report


async def resolve_config(
    config: Config, *, deadline_s: float = DEFAULT_TIMEOUT_S
) -> tuple[Config, list[str]]:
    """The config to serve: ``config`` itself, or with discovered models when it has none.

    The returned config has ``discover`` switched off, so that resolving it again (in a
    worker process) does not probe a second time.
    """
    if config.models or not config.discover:
        return config, []
    report = await discover_models(deadline_s=deadline_s)
    resolved = msgspec.structs.replace(config, models=report.groups, discover=False)
    if not report.groups:
        report.lines.append("no models found: add some under `models:` in the config (see docs/service.md)")
    return resolved, report.lines


def describe_config(config: Config) -> list[str]:
    """One line per model group: its name, aliases and deployments."""
    lines = []
    for group in config.models:
        aliases = f" (aliases: {', '.join(group.aliases)})" if group.aliases else ""
        deployments = ", ".join(d.id or f"{d.provider}/{d.model}" for d in group.deployments)
        lines.append(f"{group.name}{aliases} -> {deployments}")
    return lines
