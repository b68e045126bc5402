"""Reading an ASGI scope directly, without a framework's request object."""

from __future__ import annotations

from typing import Any

__all__ = ["HEAD_KEY", "request_method", "scope_header"]

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


def request_method(scope: Any) -> str:
    """The method the client sent (``HEAD`` for one a ``GET`` route answers)."""
    return "HEAD" if HEAD_KEY in scope else scope.get("method", "GET")
