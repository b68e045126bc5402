"""Accounting configuration: plain msgspec Structs, no database imports.

Lives under ``accounting:`` in the main config::

    accounting:
      database: {url: "postgresql+asyncpg://llmrouter@db/llmrouter"}
      auth: {enabled: auto}
      redis: {url: "redis://127.0.0.1:6379/0", prefix: "llmrouter:"}
      limits: {rpm: 600, tpm: 200000, concurrency: 16}
      budgets:
        - {key: "*", period: month, limit: 50.0, soft_limit: 40.0}
        - {key: ci-bot, model: gpt-4o, period: day, limit: 2.0}

This module is imported by :mod:`llmrouter.config`, so it must stay free of
SQLAlchemy, Redis and Litestar imports.
"""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "AccountingConfig",
    "AuthConfig",
    "BudgetRule",
    "DatabaseConfig",
    "LedgerConfig",
    "LimitsConfig",
    "RedisConfig",
]

Period = Literal["day", "month", "total"]

# Bounds checked as the config is read: out of them, a value loaded and then broke every
# request or the process (rpm -1: every request 503; tpm or concurrency -1: every one 429;
# a budget of -5: 429 "limit $0"; lease_seconds 0: Redis concurrency no longer limited;
# flush_interval 0: the ledger's writer spun at 70-80% CPU while idle). "Finite": NaN
# fails the bounds, and .inf overflowed the conversions to whole units.
RequestLimit = Annotated[int, Meta(ge=1)]
"""A limit of 0 admits nothing (even an empty minute cannot take one request or token);
no limit is ``null``, and a key that may not be used is revoked, not limited to 0. As a
key's own limits, which the key API takes from 1."""
Usd = Annotated[float, Meta(ge=0, le=sys.float_info.max)]
"""Money: 0 is a budget that admits no priced request; finite."""
Seconds = Annotated[float, Meta(gt=0, le=sys.float_info.max)]
"""A period that must pass before something happens again: 0 or less meant "at once,
forever" (a busy loop, or a lease that expires as it is taken)."""
SecondsOrZero = Annotated[float, Meta(ge=0, le=sys.float_info.max)]
"""A bound where 0 means "do not wait" (or "do not remember")."""


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Unknown keys are errors, like every other config section."""


class DatabaseConfig(_Section):
    url: str = "sqlite+aiosqlite:///./llmrouter.db"
    """SQLAlchemy async URL: ``sqlite+aiosqlite:///path`` or ``postgresql+asyncpg://...``."""
    create: bool = True
    """Apply pending schema migrations at start-up (``llmrouter db upgrade`` does the same)."""
    pool_size: Annotated[int, Meta(ge=0)] = 5
    """PostgreSQL connections kept per process (SQLAlchemy: 0 keeps no bound)."""
    echo: bool = False
    timeout: Annotated[float, Meta(gt=0)] | None = 5.0
    """Seconds a request may wait on the database (reading its key, a ``database``
    budget's reservation and settling, a budget's spend from the ledger); past it the
    request gets 503 ``accounting_unavailable`` instead of waiting for a database that
    stopped answering. Reports, key administration and migrations are not bounded.
    ``null``: no bound."""


class AuthConfig(_Section):
    enabled: Literal["auto"] | bool = "auto"
    """``auto``: on as soon as any API key exists (revoked ones included); ``false`` only
    for a local single-user setup."""
    cache_seconds: SecondsOrZero = 5.0
    """How long a verified key is trusted without a database read: the revocation lag
    of *other* workers on SQLite (this one forgets a revoked key at once; with Redis or
    PostgreSQL every replica does, see :mod:`llmrouter.accounting.key_events`)."""


class BudgetRule(_Section):
    limit: Usd
    """Hard limit in USD: requests whose reserved maximum cost would cross it get 429."""
    key: str = "*"
    """Key id or key name; ``*`` applies the rule to every key separately (and to the
    unauthenticated local user)."""
    model: str | None = None
    """Only requests for this model group count against the rule."""
    user: str | None = None
    """End users (the requests' OpenAI ``user`` field): ``*`` applies the rule to every
    end user of each key separately, a name to that one only; requests that name no
    user are not counted against it. None: the rule is not per end user."""
    period: Period = "month"
    soft_limit: Usd | None = None
    """Crossing it logs a warning, once per window, and sets ``ctx.metadata["budget"] =
    "soft_limit_reached"`` on each request settled past it (for hooks and library callers;
    no response header says so)."""


class EndUserLimits(_Section):
    """Limits of each end user of each key (the requests' OpenAI ``user`` field)."""

    rpm: RequestLimit | None = None
    tpm: RequestLimit | None = None
    concurrency: RequestLimit | None = None


class LimitsConfig(_Section):
    """Per-key defaults; a key's own ``rpm`` / ``tpm`` / ``concurrency`` override them."""

    rpm: RequestLimit | None = None
    tpm: RequestLimit | None = None
    concurrency: RequestLimit | None = None
    lease_seconds: Seconds = 900.0
    """A crashed replica's concurrency slots (Redis) and budget reservations (Redis and
    the database) are freed after this long; keep it above the longest request."""
    end_user: EndUserLimits | None = None
    """Also limit each end user of a key on their own; requests naming none are not."""


class RedisConfig(_Section):
    url: str | None = None
    """When set, rate-limit windows and budget reservations live in Redis and are shared
    by every replica."""
    prefix: str = "llmrouter:"
    timeout: Annotated[float, Meta(gt=0)] = 2.0
    """Seconds a check may wait for a free connection, to connect, and for Redis's reply;
    past that the request gets 503 ``accounting_unavailable`` (a Redis that stops
    answering fails requests, it does not hold them)."""
    max_connections: Annotated[int, Meta(ge=1)] = 100
    """Connections per process; more concurrent checks wait for one (up to ``timeout``)."""


class LedgerConfig(_Section):
    batch_size: Annotated[int, Meta(ge=1)] = 200
    flush_interval: Seconds = 0.25
    """Seconds between writes when rows trickle in (a full batch is written at once)."""
    journal_dir: str | None = "./llmrouter-journal"
    """Each row is appended here before it counts as recorded; rows of a process that died
    (or shut down while the database was away) are replayed at the next start. ``null``
    keeps rows in memory only (lost if the process dies before they are written)."""
    shutdown_timeout: SecondsOrZero = 10.0
    """How long shutdown keeps retrying the database before leaving rows to the journal."""


BudgetBackend = Literal["auto", "memory", "redis", "database"]


class AccountingConfig(_Section):
    enabled: bool = True
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    budgets: list[BudgetRule] = msgspec.field(default_factory=list)
    budget_backend: BudgetBackend = "auto"
    """Where reservations are made atomic: ``memory`` (one process), ``redis`` (Lua, shared),
    ``database`` (conditional UPDATE, shared). ``auto``: redis when configured, else
    database on PostgreSQL or with ``server.workers > 1``, else memory."""
    ledger: LedgerConfig = msgspec.field(default_factory=LedgerConfig)
