"""End users: the people an application serves through one key, named by each request's
OpenAI ``user`` (or ``safety_identifier``) field.

The ledger keeps the name without NUL and cut to its column's length; budgets seed an
end user's spend from those rows, so they use the name the same way. Counters (budget
windows, rate-limit windows) are named by a digest of it: names come from clients, of
any length and any characters.
"""

from __future__ import annotations

import hashlib

__all__ = ["MAX_LENGTH", "as_stored", "counter_tag"]

MAX_LENGTH = 200
"""The most of a name the ledger keeps (its ``end_user`` column)."""


def as_stored(name: str | None) -> str | None:
    """``name`` as the ledger stores it (None for none)."""
    return name.replace("\x00", "")[:MAX_LENGTH] if name else None


def counter_tag(name: str) -> str:
    """A short, safe tag for ``name`` in counter names."""
    return "u:" + hashlib.sha256(name.encode()).hexdigest()[:32]
