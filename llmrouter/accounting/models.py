"""SQLModel tables: API keys, the usage ledger, shared budget counters.

Times are Unix seconds (floats) so that range queries behave the same on SQLite and
PostgreSQL; the ledger also keeps the UTC ``day`` as text for portable grouping.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Column, Double, Index, Integer, String, Text
from sqlmodel import Field, SQLModel

__all__ = [
    "TABLES",
    "ApiKeyRow",
    "BudgetCounterRow",
    "BudgetReservationRow",
    "LedgerRow",
    "SchemaVersionRow",
]


class ApiKeyRow(SQLModel, table=True):
    __tablename__ = "llmr_api_keys"

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(index=True, max_length=200)
    prefix: str = Field(sa_column=Column(String(16), unique=True, nullable=False))
    """Public part of the secret, for lookup; unique."""
    secret_hash: str = Field(max_length=64)
    """Hex SHA-256 of the whole secret (the secret itself is never stored)."""
    scopes: str = Field(default="user", max_length=100)
    """Comma-separated: ``admin``, ``user``."""
    allowed_models: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    """Comma-separated model names / glob patterns; NULL allows every model."""
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    budget: float | None = None
    budget_period: str | None = Field(default=None, max_length=10)
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    note: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    budget_version: int | None = None
    """Raised when the key's budget is set again after none, or its period changes: its
    spend is then counted afresh from the ledger (migration 3; NULL counts as 0)."""


class LedgerRow(SQLModel, table=True):
    __tablename__ = "llmr_ledger"
    # Reports filter on the key and a time range; every other index costs each insert.
    __table_args__ = (Index("ix_llmr_ledger_key_created", "api_key_id", "created_at"),)

    # SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    entry_id: str = Field(sa_column=Column(String(40), unique=True, nullable=False))
    """Made when the row is recorded; unique, so that a batch retried after an ambiguous
    failure, or a journal replayed, cannot bill twice."""
    request_id: str = Field(max_length=200)
    """Not unique: clients may reuse ``X-Request-ID``."""
    created_at: float
    day: str = Field(max_length=10)
    api_key_id: str | None = Field(default=None, max_length=40)
    operation: str = Field(default="chat", max_length=20)
    stream: bool = False
    model_group: str | None = Field(default=None, max_length=200)
    deployment: str | None = Field(default=None, max_length=200)
    provider: str | None = Field(default=None, max_length=100)
    upstream_model: str | None = Field(default=None, max_length=200)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: float = Field(default=0.0, sa_column=Column(Double, nullable=False, default=0.0))
    cost_source: str | None = Field(default=None, max_length=20)
    usage_estimated: bool = False
    cache_status: str | None = Field(default=None, max_length=20)
    latency_ms: float | None = None
    ttft_ms: float | None = None
    status: str = Field(default="ok", max_length=20)
    """``ok``, ``error``, ``cancelled`` (billed for what was generated) or ``rejected``."""
    error_code: str | None = Field(default=None, max_length=100)
    attempts: int = 0
    end_user: str | None = Field(default=None, max_length=200)
    """The request's OpenAI ``user`` field: the caller's own end user (migration 4)."""


class BudgetCounterRow(SQLModel, table=True):
    """Spend and open reservations per budget window, for the ``database`` budget backend."""

    __tablename__ = "llmr_budget_counters"

    counter: str = Field(primary_key=True, max_length=300)
    spent_nanos: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    reserved_nanos: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    ends_at: float | None = Field(default=None, sa_column=Column(Double, nullable=True, index=True))
    """When the window ends (Unix seconds; NULL for a ``total`` budget, and for counters
    made before migration 5): a day later the counter and its leases are deleted."""


class BudgetReservationRow(SQLModel, table=True):
    """One open reservation of a ``database`` budget counter (migration 5): settling
    deletes it, and a reservation its replica never settled (the replica died) is freed
    once ``expires_at`` has passed."""

    __tablename__ = "llmr_budget_reservations"

    counter: str = Field(primary_key=True, max_length=300)
    request_id: str = Field(primary_key=True, max_length=200)
    amount_nanos: int = Field(sa_column=Column(BigInteger, nullable=False))
    expires_at: float = Field(sa_column=Column(Double, nullable=False))
    """Unix seconds, by the clock of the replica that reserved."""


class SchemaVersionRow(SQLModel, table=True):
    __tablename__ = "llmr_schema_version"

    version: int = Field(primary_key=True)
    description: str = Field(max_length=200)
    applied_at: float


TABLES: list[Any] = [
    ApiKeyRow.__table__,  # type: ignore[attr-defined]
    LedgerRow.__table__,  # type: ignore[attr-defined]
    BudgetCounterRow.__table__,  # type: ignore[attr-defined]
    BudgetReservationRow.__table__,  # type: ignore[attr-defined]
    SchemaVersionRow.__table__,  # type: ignore[attr-defined]
]
