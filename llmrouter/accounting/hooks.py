"""The accounting steps of the request path, as router hooks.

``before_request``: the key may use this model -> rate limits (the key's, then its end
user's) -> budget reservation of ``ctx.max_cost``. ``after_request``: settle the budget
to ``ctx.cost`` -> free the concurrency slots and true up TPM -> queue the ledger row.
A request refused in ``before_request`` gives back whatever it had taken and gets a
``rejected`` ledger row; one admitted is journaled as in flight, with its reservation,
so that it is billed (``interrupted``) should its process die before it finishes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import anyio
import msgspec

from llmrouter.accounting import end_users
from llmrouter.accounting.budgets import BudgetManager, MemoryBudgetStore, Reservation
from llmrouter.accounting.config import LimitsConfig
from llmrouter.accounting.in_flight import InFlight, Interrupted, in_flight
from llmrouter.accounting.keys import ApiKey
from llmrouter.accounting.ledger import LedgerWriter, row_from_context
from llmrouter.accounting.limits import EffectiveLimits, KeyLimitError, Limiter, LimitTicket, MemoryLimiter
from llmrouter.accounting.retries import Retries
from llmrouter.aio import on_asyncio
from llmrouter.context import new_id
from llmrouter.counting import estimate_prompt
from llmrouter.errors import (
    AccountingUnavailableError,
    AuthenticationError,
    LLMRouterError,
    PermissionDeniedError,
)
from llmrouter.hooks import RouterHooks
from llmrouter.types import ChatRequest, CompletionRequest

if TYPE_CHECKING:
    from llmrouter.accounting.keys import KeyStore
    from llmrouter.context import RequestContext

__all__ = ["AccountingHooks"]

log = logging.getLogger("llmrouter.accounting")
_RECORDED = "_llmrouter_ledger"


class _Admission(msgspec.Struct):
    """What an admitted request took, given back when it settles (the context is held so
    that its id stays unique while admitted). A Struct: made for every request, a
    NamedTuple's ``__new__`` (a Python function) cost three times as much."""

    ctx: RequestContext
    tickets: tuple[LimitTicket, ...]
    """The key's limits, then its end user's."""
    reservation: Reservation | None
    line: InFlight | None
    """Its journal line as a request in flight (None without a journal)."""

    @property
    def entry_id(self) -> str | None:
        """Its ledger row's."""
        return self.line.entry_id if self.line is not None else None


class _Held(NamedTuple):
    """What an admitted request holds, journaled with it, so that should its process end
    first the next start gives it back (:meth:`AccountingHooks.release_interrupted`)."""

    reservation: Reservation | None
    tickets: tuple[LimitTicket, ...]


def _read_hold(hold: object, request_id: str) -> _Held | None:
    """What a request held, as journaled (decoded JSON) or kept in this process; None
    when it held nothing, or its line is unreadable (logged)."""
    if hold is None or isinstance(hold, _Held):
        return hold
    try:
        return msgspec.convert(hold, _Held)
    except msgspec.ValidationError as exc:
        log.error("accounting: what request %s held is unreadable: %s", request_id, exc)
        return None


class AccountingHooks(RouterHooks):
    """Admits requests against keys, limits and budgets; settles and records them.

    Every part is optional, so a library user can take only what they need (e.g. a
    ledger without keys).

    Args:
        keys: resolves ``ctx.api_key_id`` to a key when ``ctx.principal`` is not set.
        ledger: where finished requests are recorded.
        budgets: spend caps.
        limiter: RPM / TPM / concurrency backend.
        limits: defaults for keys that set none of their own.
        retries: where a rate-limit release the limiter fails goes to be tried again
            (None: logged and left to the slot's lease).
    """

    def __init__(
        self,
        *,
        keys: KeyStore | None = None,
        ledger: LedgerWriter | None = None,
        budgets: BudgetManager | None = None,
        limiter: Limiter | None = None,
        limits: LimitsConfig | None = None,
        retries: Retries | None = None,
    ) -> None:
        self.keys = keys
        self.ledger = ledger
        self.budgets = budgets
        self.limiter = limiter
        self.limits = limits or LimitsConfig()
        self.retries = retries
        self._admitted: dict[int, _Admission] = {}

    @property
    def limits(self) -> LimitsConfig:
        """The limits of requests without a key, or of a key without limits of its own."""
        return self._limits

    @limits.setter
    def limits(self, limits: LimitsConfig) -> None:
        self._limits = limits
        self._default_limits = EffectiveLimits(rpm=limits.rpm, tpm=limits.tpm, concurrency=limits.concurrency)
        user = limits.end_user
        self._end_user_limits = (
            EffectiveLimits(rpm=user.rpm, tpm=user.tpm, concurrency=user.concurrency) if user else None
        )

    @property
    def in_flight(self) -> int:
        return len(self._admitted)

    @property
    def settles_inline(self) -> bool:  # type: ignore[override]
        """True when settling waits on nothing: budgets and limits in this process (the
        ledger row is queued without waiting); a Redis or database store waits on I/O."""
        return (self.budgets is None or isinstance(self.budgets.store, MemoryBudgetStore)) and (
            self.limiter is None or isinstance(self.limiter, MemoryLimiter)
        )

    def effective_limits(self, key: ApiKey | None) -> EffectiveLimits:
        """The key's own limits, else the configured defaults."""
        if key is None or (key.rpm is None and key.tpm is None and key.concurrency is None):
            return self._default_limits
        return EffectiveLimits(
            rpm=key.rpm if key.rpm is not None else self.limits.rpm,
            tpm=key.tpm if key.tpm is not None else self.limits.tpm,
            concurrency=key.concurrency if key.concurrency is not None else self.limits.concurrency,
        )

    async def _load_principal(self, ctx: RequestContext, key_id: str, keys: KeyStore) -> ApiKey:
        """The key a library caller named by ``ctx.api_key_id``, through the store's cache:
        the one its changes and revocations drop at once (a cache of the hooks' own kept
        a revoked key admitted for seconds)."""
        key = await keys.load_cached(key_id)
        if key is None:
            raise AuthenticationError(f"unknown API key id {key_id}")
        ctx.principal = key
        return key

    def _check_access(self, ctx: RequestContext, key: ApiKey | None) -> None:
        if key is None:
            return
        state = key.state()
        if state != "active":
            raise AuthenticationError(f"API key sk-llmr-{key.prefix}-... is {state}", code=f"key_{state}")
        requested = getattr(ctx.request, "model", None)
        if not key.allows_model(requested, ctx.model_group):
            raise PermissionDeniedError(
                f"this API key may not use model {requested or ctx.model_group!r}",
                code="model_not_allowed",
                param="model",
            )

    async def before_request(self, ctx: RequestContext) -> None:
        """Admit or refuse (401/403/429); on refusal nothing stays taken."""
        tickets: list[LimitTicket] = []
        reservation: Reservation | None = None
        try:
            # The key the service authenticated, else one a library caller named by id.
            key = ctx.principal if isinstance(ctx.principal, ApiKey) else None
            if key is not None:
                ctx.api_key_id = key.id
            elif ctx.api_key_id is not None and self.keys is not None:
                key = await self._load_principal(ctx, ctx.api_key_id, self.keys)
            self._check_access(ctx, key)
            limits = self.effective_limits(key)
            limited = not limits.empty
            limiter = self.limiter
            # Without limits (neither the key's nor its end users'), nothing below applies:
            # checked once, not step by step.
            if limiter is not None and (limited or self._end_user_limits is not None):
                subject = key.id if key else "-"
                if not ctx.prompt_tokens_estimate and self._counts_tokens(ctx, limits):
                    # Unpriced: the router did not count the prompt, which a TPM limit charges now.
                    ctx.prompt_tokens_estimate = await _estimate_prompt(ctx)
                # The end user's limits first: a customer refused by their own must not use up
                # the requests and tokens the key's other customers share.
                if self._end_user_limits is not None and (end_user := _end_user_of(ctx)):
                    tickets.append(
                        await _acquire_for_end_user(
                            limiter,
                            self._end_user_limits,
                            subject,
                            end_user,
                            ctx.prompt_tokens_estimate,
                            key_limits=limits,
                        )
                    )
                if limited:
                    tickets.append(await limiter.acquire(subject, limits, ctx.prompt_tokens_estimate))
                    ctx.extra_headers = tickets[-1].headers()  # the key's
            if self.budgets is not None and self.budgets.may_apply(key):
                end_user = _end_user_of(ctx)
                reservation = await self.budgets.reserve(
                    key,
                    ctx.model_group,
                    ctx.max_cost,
                    new_id(),
                    end_user=end_user,
                    output_limit=getattr(ctx.request, "output_limit", None),
                )
                if ctx.fallback_groups:
                    # Only those whose per-model budgets take it remain fallbacks.
                    ctx.fallback_groups = await self.budgets.reserve_fallbacks(
                        reservation, key, ctx.fallback_groups, ctx.max_cost, end_user=end_user
                    )
        except BaseException as exc:
            # Refused, failed or cancelled half-way: the rate-limit slots go back.
            if tickets and self.limiter is not None:
                await self._give_back_unadmitted(
                    self.limiter, tickets, ctx.request_id, refused=isinstance(exc, LLMRouterError)
                )
            if isinstance(exc, LLMRouterError):
                self._record(ctx, status="rejected", error_code=exc.code)
            elif isinstance(exc, Exception):
                # A store failed (Redis or the database down): a 503 the client may retry.
                error = unavailable(exc, f"admitting request {ctx.request_id}")
                self._record(ctx, status="rejected", error_code=error.code)
                raise error from exc
            else:
                # Cancelled while a store was slow (the client left, a caller's timeout):
                # no upstream was called, but the request was made, so it has its row.
                self._record(ctx, status="cancelled")
            raise
        line = None
        if self.ledger is not None and self.ledger.journaling:
            held = _Held(reservation, tuple(tickets)) if reservation is not None or tickets else None
            line = in_flight(ctx, new_id(), held)
            self.ledger.open(line)
        self._admitted[id(ctx)] = _Admission(ctx, tuple(tickets), reservation, line)

    def _counts_tokens(self, ctx: RequestContext, limits: EffectiveLimits) -> bool:
        """Whether a TPM limit applies to the request: the key's, or its end user's."""
        if limits.tpm is not None:
            return True
        end_user = self._end_user_limits
        return end_user is not None and end_user.tpm is not None and _end_user_of(ctx) is not None

    async def after_request(self, ctx: RequestContext) -> None:
        """Settle the budget, record the row, release the limits. Never raises (a failure
        is logged; the row is still queued)."""
        admission = self._admitted.pop(id(ctx), None)
        if admission is None:
            self._record(ctx)
            return
        try:
            if admission.reservation is not None:
                await self._settle_and_record(ctx, admission)
            else:
                self._record(ctx, entry_id=admission.entry_id)
        finally:  # whatever the budget did: a slot kept here would refuse the key's next requests
            if admission.tickets and self.limiter is not None:
                usage = ctx.usage
                tokens = (usage.total_tokens or usage.prompt_tokens + usage.completion_tokens) if usage else 0
                for ticket in admission.tickets:
                    await self._give_back(self.limiter, ticket, ctx.request_id, tokens)

    async def _settle_and_record(self, ctx: RequestContext, admission: _Admission) -> None:
        """Settle the budget, record the row whatever that did, then journal a settlement
        that waits for its store: after its row, as a replay expects (it takes such a line
        for a request whose row it has), so that it outlives this process should it end
        before the store comes back."""
        reservation = admission.reservation
        waiting = False
        try:
            if reservation is not None and self.budgets is not None:
                if await self.budgets.settle(reservation, ctx.cost, ctx.model_group):  # the group that served
                    ctx.metadata["budget"] = "soft_limit_reached"
                waiting = bool(reservation.windows)  # those the store did not take wait in the retries
        except Exception:
            log.exception("accounting: settling request %s's budget failed", ctx.request_id)
        finally:
            self._record(ctx, entry_id=admission.entry_id)
        if waiting and admission.line is not None and self.ledger is not None:
            self.ledger.keep_unsettled(admission.line, float(ctx.cost or 0.0), ctx.model_group)

    def on_rejected(self, ctx: RequestContext, error: LLMRouterError) -> None:
        """Refused elsewhere (unknown model, another hook): still worth a ``rejected`` row."""
        if ctx.metadata.get(_RECORDED) is None:
            self._record(ctx, status="rejected", error_code=error.code)

    def _record(
        self,
        ctx: RequestContext,
        *,
        status: str | None = None,
        error_code: str | None = None,
        entry_id: str | None = None,
    ) -> None:
        if self.ledger is None or ctx.metadata.get(_RECORDED) is not None:
            return  # one row per request, whichever path saw it first
        ctx.metadata[_RECORDED] = "1"
        if ctx.api_key_id is None and isinstance(ctx.principal, ApiKey):
            ctx.api_key_id = ctx.principal.id  # refused before before_request resolved it
        try:
            self.ledger.record(row_from_context(ctx, status=status, error_code=error_code, entry_id=entry_id))
        except Exception:  # after_request must not raise
            log.exception("accounting: recording request %s failed", ctx.request_id)

    async def release_interrupted(self, interrupted: Sequence[Interrupted]) -> None:
        """Give back what requests a process did not finish held (the ledger's
        ``interrupted`` rows, replayed from a dead process's journal or recorded at
        shutdown): each budget reservation a Redis or database store still holds becomes
        the cost the row bills, and each Redis concurrency slot is freed, rather than
        both waiting for their leases (15 minutes) to end. Stores in memory hold none of
        another process's; a failure is tried again later, like any settlement."""
        limiter = None if isinstance(self.limiter, MemoryLimiter) else self.limiter
        for row, line in interrupted:
            held = _read_hold(line.hold, row.request_id)
            if held is None:
                continue
            if held.reservation is not None and self.budgets is not None:
                await self.budgets.settle_held(held.reservation, row.cost, row.model_group)
            if limiter is not None:
                for ticket in held.tickets:
                    await self._give_back(limiter, ticket, row.request_id, ticket.tokens)

    async def settle_unsettled(self, unsettled: Sequence[InFlight]) -> None:
        """Settle what a dead process's finished requests held, whose settlements still
        waited for their store (the ledger replayed them): each budget window the store
        still holds becomes the request's cost; one already settled (a retry went through
        before the process ended) is left alone by the store. Their limits' slots are not
        released again (a token true-up would count twice): they wait for their lease."""
        if self.budgets is None:
            return
        for line in unsettled:
            held = _read_hold(line.hold, line.request_id)
            if held is not None and held.reservation is not None:
                await self.budgets.settle_held(held.reservation, line.unsettled_cost, line.model_group)

    async def _give_back_unadmitted(
        self, limiter: Limiter, tickets: list[LimitTicket], request_id: str, *, refused: bool
    ) -> None:
        """Give back the limits of an admission that did not go through. Refused, its
        stores have just answered: at once (shielded, so that a cancelled request does not
        keep a concurrency slot), and the client's retry finds its slot free. Failed (a
        store down or slow) or cancelled, Redis's in the background: awaited, the request's
        503 waited another ``redis.timeout`` on a Redis that had stopped answering."""
        # Off asyncio (trio) the background give-backs would wait for shutdown: at once there.
        if refused or self.retries is None or isinstance(limiter, MemoryLimiter) or not on_asyncio():
            with anyio.CancelScope(shield=True):
                for ticket in tickets:
                    await self._give_back(limiter, ticket, request_id)
            return
        for ticket in tickets:
            self.retries.give_back_held(
                f"releasing {request_id}'s limits", partial(limiter.release, ticket, 0)
            )

    async def _give_back(
        self, limiter: Limiter, ticket: LimitTicket, request_id: str, tokens: int = 0
    ) -> None:
        """Release an admission's limits, with the ``tokens`` it used (none when it was
        refused); a failure is logged and tried again later, and the other tickets are
        still released."""
        try:
            await limiter.release(ticket, tokens)
        except Exception as exc:  # noqa: BLE001
            log.warning("accounting: releasing request %s's limits failed: %s", request_id, _describe(exc))
            if self.retries is not None:
                self.retries.add(f"releasing {request_id}'s limits", partial(limiter.release, ticket, tokens))


def unavailable(cause: Exception, doing: str) -> AccountingUnavailableError:
    """The 503 for a request whose keys, limits or budgets cannot be checked now, because
    ``doing`` failed with ``cause`` (logged; the client sees neither)."""
    log.warning("accounting: %s failed: %s", doing, _describe(cause))
    return AccountingUnavailableError(
        "accounting is unavailable: the request's key, limits or budgets cannot be checked now",
        retry_after=1,
    )


def _end_user_of(ctx: RequestContext) -> str | None:
    return ctx.request.end_user if ctx.request is not None else None


async def _estimate_prompt(ctx: RequestContext) -> int:
    request = ctx.request
    if not isinstance(request, ChatRequest | CompletionRequest):
        return 0
    return await estimate_prompt(request, ctx.model_group or request.model)


async def _acquire_for_end_user(
    limiter: Limiter,
    limits: EffectiveLimits,
    subject: str,
    end_user: str,
    tokens: int,
    *,
    key_limits: EffectiveLimits,
) -> LimitTicket:
    """An end user's own limits (``limits.end_user``), in windows of their own beside the
    key's (``subject``, limited by ``key_limits``).

    A refusal names the end user, and its ``x-ratelimit-*`` headers are the key's, as
    on every response of the key: a client paces the key by them, and the end user's
    would tell it the key had run out."""
    name = end_users.as_stored(end_user) or ""
    try:
        return await limiter.acquire(f"{subject}|{end_users.counter_tag(name)}", limits, tokens)
    except KeyLimitError as exc:
        key_headers = {} if key_limits.empty else await limiter.window_headers(subject, key_limits)
        raise KeyLimitError(
            f"{exc.message} (end user {name[:100]!r})",
            retry_after=exc.retry_after,
            limit_headers=key_headers,
            never_fits=exc.never_fits,
        ) from None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
