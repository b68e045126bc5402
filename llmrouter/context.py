"""Per-request state that travels the request path and records what happened.

The caller (the service, or a library user) creates a :class:`RequestContext`
with who is asking; the router fills in where the request went, what it used and
cost, and how it ended. Hooks (accounting, telemetry, logs) read it.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from llmrouter.ids import new_id

if TYPE_CHECKING:
    from llmrouter.errors import LLMRouterError
    from llmrouter.types import ChatRequest, CompletionRequest, Usage

__all__ = ["CacheStatus", "CostSource", "RequestContext", "RequestStatus", "current_context", "new_id"]

CacheStatus = Literal["hit", "miss", "bypass", "coalesced"]
CostSource = Literal["provider", "price_table", "unpriced", "cache"]
RequestStatus = Literal["ok", "error", "cancelled"]


@dataclass(slots=True, kw_only=True, weakref_slot=True)
class RequestContext:
    """Who asked, and (after the call) what the router did with the request.

    A context records one request: pass a new one to each call. The router refuses one
    that has been through a call already (``ValueError``), whether that call is over or
    still running: its usage, cost, status and ``request_id`` (the ledger's key) would
    describe two requests at once. To ask again for the same caller, make another with
    the same caller fields (``api_key_id``, ``principal``, ``metadata``...).
    """

    request_id: str = field(default_factory=new_id)
    api_key_id: str | None = None
    """The id of the API key that pays (None for a local, unauthenticated user)."""
    principal: Any = None
    """The authenticated principal object (accounting's), for scope and model checks."""
    no_cache: bool = False
    """``Cache-Control: no-cache``: skip the lookup, refresh the entry."""
    no_store: bool = False
    """``Cache-Control: no-store``: don't write the answer to the cache."""
    fallback_groups: tuple[str, ...] = ()
    """The groups after ``model_group`` that may serve the request: its fallbacks the
    caller may use, less those whose per-model budgets cannot take it (accounting reserves
    theirs too, and passes them over). Set by the router, narrowed at admission."""
    max_age: float | None = None
    """``Cache-Control: max-age=N``: a stored answer older than N seconds is a miss
    (``max-age=0`` is ``no_cache``)."""
    traceparent: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    extra_headers: dict[str, str] | None = None
    """Headers a hook adds to the client's response (accounting: ``x-ratelimit-*``)."""

    # --- filled by the router -------------------------------------------------------
    operation: Literal["chat", "completion"] = "chat"
    stream: bool = False
    request: ChatRequest | CompletionRequest | None = None
    model_group: str | None = None
    deployment: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    attempts: int = 0
    fallbacks: int = 0
    prompt_tokens_estimate: int = 0
    max_cost: float | None = None
    """The most this request can cost (prompt + max output at the price); reserved."""
    prompt_cost_estimate: float = 0.0
    """The estimated prompt at the highest input price it may be sent at: what a request
    its process did not finish is billed (accounting's ``interrupted`` rows)."""
    usage: Usage | None = None
    cost: float | None = None
    cost_source: CostSource | None = None
    cache_status: CacheStatus | None = None
    status: RequestStatus | None = None
    error: LLMRouterError | None = None
    started_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    chunk_times: list[float] | None = None
    """``perf_counter()`` of each stream chunk delivered, appended by the router once a
    hook made it a list (telemetry does, for the time per output chunk)."""
    finished_at: float | None = None
    created: float = field(default_factory=time.time)
    """Wall-clock start (Unix seconds), for ledger rows."""

    @property
    def ttft_ms(self) -> float | None:
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.started_at) * 1000

    @property
    def latency_ms(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at) * 1000


current_context: ContextVar[RequestContext | None] = ContextVar("llmrouter_request_context", default=None)
"""The request being served, set by the router around each provider call, so that HTTP
providers can forward ``traceparent`` and ``X-Request-ID`` without a signature change."""
