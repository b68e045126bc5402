"""Package exports imported on first use (a module ``__getattr__``, PEP 562).

``llmrouter.config`` imports the settings of the cache, accounting and telemetry, and
with them their packages, on every ``import llmrouter``; the rest of each package loads
when one of its exports is first asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, modules: Mapping[str, str]) -> Callable[[str], Any]:
    """A ``__getattr__`` for ``package`` that imports each name from its module in
    ``modules`` (name -> module path) when it is first asked for."""

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
