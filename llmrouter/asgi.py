"""Reading an ASGI scope directly, without a framework's request object."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["HEAD_KEY", "request_method", "scope_header", "shown_path"]

HEAD_KEY = "llmrouter.head"
"""Set in the scope of a ``HEAD`` request that a ``GET`` route answers
(:mod:`llmrouter.server.head`), where the method reads ``GET``."""


def scope_header(scope: Any, name: bytes) -> bytes | None:
    """The value of header ``name`` (lowercase: ASGI servers send names lowercased, as the
    specification requires) in ``scope``, the first of repeated ones; None when absent.

    A loop that stops at the name: a dict of all the headers cost twice as much, and a
    Litestar ``Headers`` far more (docs/benchmarks.md, items 38 and 45)."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


_SECRET_IN_PATH = re.compile(r"(sk-llmr-[a-z0-9]{8}-)[^/]+")
"""An API key's secret, shaped as :mod:`llmrouter.accounting.keys` makes them (not
imported: it brings SQLAlchemy), up to the next path segment; group 1 is its public part."""


def shown_path(path: str) -> str:
    """``path`` as logs and spans show it: an API key secret in it (the admin routes take
    one as a key's reference) cut to ``sk-llmr-<prefix>-...``, since no secret goes into
    logs."""
    if "sk-llmr-" not in path:  # nearly every request: no regex run
        return path
    return _SECRET_IN_PATH.sub(r"\1...", path)


def request_method(scope: Any) -> str:
    """The method the client sent (``HEAD`` for one a ``GET`` route answers)."""
    return "HEAD" if HEAD_KEY in scope else scope.get("method", "GET")
