"""Dispatch: try deployments in strategy order, retry, cool down, fall back.

One :class:`AttemptPlan` walks a model group and then its fallback groups. Within a
group, an untried deployment is tried at once after a failure; the same deployment is
tried again only for retryable errors, after its own jittered exponential backoff (or
the upstream's ``Retry-After``, capped). Errors that are the request's
own fault (a bad request) end the plan at once; errors of one deployment (its 401, a
context window too small, an unsupported feature) move on without retrying it, and a
deployment whose declared capabilities rule the request out is passed over unasked.

Streams can only be retried before their first chunk: once content has reached the
caller, a failure ends the stream with the error.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import Token
from typing import Any, TypeVar

import anyio
import msgspec

from llmrouter.aio import time_limit
from llmrouter.context import RequestContext, current_context
from llmrouter.counting import estimate_prompt
from llmrouter.deployments import DeploymentState, GroupState
from llmrouter.errors import (
    ContextWindowExceededError,
    InvalidRequestError,
    LLMRouterError,
    ModelNotFoundError,
    NestedTooDeeplyError,
    NoDeploymentAvailableError,
    PermissionDeniedError,
    UnsupportedFeatureError,
    UpstreamAuthenticationError,
    UpstreamError,
    UpstreamModelNotFoundError,
    UpstreamTimeoutError,
)
from llmrouter.hooks import RouterHooks
from llmrouter.provider import Provider
from llmrouter.types import ChatRequest, CompletionRequest

__all__ = [
    "AttemptCancelledError",
    "AttemptPlan",
    "dispatch_call",
    "dispatch_stream",
    "may_use",
    "usable_chain",
]

logger = logging.getLogger("llmrouter.dispatch")

R = TypeVar("R")
C = TypeVar("C")
Req = TypeVar("Req", ChatRequest, CompletionRequest)

# Closing an upstream stream must not hang a cancelled request for long.
_CLOSE_GRACE_S = 5.0


class AttemptCancelledError(LLMRouterError):
    """What ``on_attempt`` gets for an attempt its caller cut short (cancelled mid-call, or
    a stream closed before its end), so that every upstream call ends with exactly one
    ``on_attempt``. Never raised, and no failure of the deployment: the caller left, the
    deployment did nothing wrong (no failure is counted, no cooldown started)."""

    default_code = "cancelled"


def is_mismatch(exc: LLMRouterError) -> bool:
    """True when a healthy deployment cannot take this request (its context window, a
    feature it lacks, its moderation flagging the prompt: OpenRouter's 403): another
    deployment may, and the refusal is not a failure of it. Counted as one, a client's
    flagged prompts would cool the deployment down for everyone."""
    return isinstance(exc, (ContextWindowExceededError, UnsupportedFeatureError, PermissionDeniedError))


def is_request_fault(exc: LLMRouterError) -> bool:
    """True when the same request would fail on every deployment."""
    if is_mismatch(exc):
        return False
    return isinstance(exc, InvalidRequestError) or exc.http_status in (413, 422)


def as_router_error(exc: Exception, deployment: DeploymentState) -> LLMRouterError:
    """Errors that escaped a provider untranslated are provider bugs: log and wrap them."""
    if isinstance(exc, LLMRouterError):
        if exc.provider is None:
            exc.provider = deployment.config.provider
        if exc.http_status == 401:
            # The upstream refused this deployment's credentials: not the caller's key.
            return UpstreamAuthenticationError(
                f"the upstream refused the credentials of deployment {deployment.id!r} "
                f"({exc.provider}): {exc.message}",
                provider=exc.provider,
            )
        return exc
    if isinstance(exc, RecursionError):
        # JSON nested just under the decoder's limit, which the provider's encoder, deeper
        # in the stack, cannot take: the request's fault, not the deployment's.
        logger.warning("provider %s: the request is nested too deeply (%s)", deployment.id, exc)
        return NestedTooDeeplyError()
    if isinstance(exc, TimeoutError):
        return UpstreamTimeoutError(
            f"deployment {deployment.id!r} timed out", provider=deployment.config.provider
        )
    logger.error("provider %s raised %r", deployment.id, exc, exc_info=exc)
    return UpstreamError(
        f"deployment {deployment.id!r} failed: {type(exc).__name__}",
        provider=deployment.config.provider,
        retryable=False,
    )


def may_use(ctx: RequestContext, group: GroupState) -> bool:
    """Whether the caller's key (its allow-list, by the group's name or an alias) lets
    ``group`` serve as a fallback: a key allowed only a cheap group must not be served,
    priced or billed by its dear fallback. True without a key that has a list."""
    allows = getattr(ctx.principal, "allows_model", None)
    return allows is None or bool(allows(group.name, *group.config.aliases))


def usable_chain(ctx: RequestContext, groups: list[GroupState]) -> list[GroupState]:
    """``groups`` (a model's group, then its fallbacks) without the fallbacks the
    caller's key may not use (see :func:`may_use`); the requested group is the key's
    own check (accounting's 403)."""
    if len(groups) == 1 or ctx.principal is None:
        return groups
    return [groups[0], *(group for group in groups[1:] if may_use(ctx, group))]


class AttemptPlan:
    """Decides which deployment each attempt goes to, and what a failure means."""

    def __init__(
        self,
        ctx: RequestContext,
        groups: Sequence[GroupState],
        hooks: Sequence[RouterHooks],
        request: ChatRequest | CompletionRequest,
        *,
        stream: bool,
    ) -> None:
        self.ctx = ctx
        self._request = request
        self._stream = stream
        self._prompt_counted = False
        self._groups = list(groups)
        self._hooks = hooks
        self._index = 0
        self._tried: list[DeploymentState] = []
        self._exhausted: list[DeploymentState] = []
        self._attempts_left = self._groups[0].retry.attempts + 1
        # When each deployment tried may be tried again (time.monotonic()): per deployment,
        # so that one's Retry-After holds while others fail in between.
        self._not_before: dict[DeploymentState, float] = {}
        self._last_error: LLMRouterError | None = None

    async def next(self) -> tuple[GroupState, DeploymentState]:
        """The group and deployment of the next attempt; raises the last error when none is left."""
        while self._index < len(self._groups):
            group = self._groups[self._index]
            if self._attempts_left > 0:
                try:
                    deployment = await group.select(self._tried, self._exhausted)
                except NoDeploymentAvailableError as exc:
                    self._last_error = self._last_error or exc
                else:
                    if deployment.limits is not None and await self._passed_over(deployment):
                        continue
                    wait = self._not_before.get(deployment, 0.0) - time.monotonic()
                    if wait > 0:
                        await anyio.sleep(wait)
                        # Pick again: during the back-off another request may have taken
                        # the slot this pick saw free (max_concurrency), or a better
                        # deployment may have come back from its cooldown.
                        continue
                    self._attempts_left -= 1
                    self.ctx.attempts += 1
                    return group, deployment
            self._move_to_fallback(group)
        assert self._last_error is not None
        raise self._last_error

    async def _passed_over(self, deployment: DeploymentState) -> bool:
        """Whether the pick ``deployment`` is not to be used: its declared capabilities
        (``limits``) rule the request out, or the prompt had to be counted for them first
        (pick again: another request may have taken its slot meanwhile).

        One ruled out is left out of this request with no attempt, as its refusal would
        leave it (no failure, no cooldown); the refusal is the error raised when nothing
        else serves the request."""
        limits, ctx = deployment.limits, self.ctx
        assert limits is not None
        if limits.unchecked_context is not None and not self._prompt_counted:
            # Counted once, and only when a deployment needs it.
            self._prompt_counted = True
            if not ctx.prompt_tokens_estimate:  # a priced request's is counted already
                ctx.prompt_tokens_estimate = await estimate_prompt(self._request, deployment.config.model)
                return True
        refusal = limits.refusal(
            self._request,
            stream=self._stream,
            prompt_tokens=ctx.prompt_tokens_estimate,
            deployment=deployment.id,
            provider=deployment.config.provider,
        )
        if refusal is None:
            return False
        self._last_error = refusal
        self._exhausted.append(deployment)
        return True

    def _move_to_fallback(self, group: GroupState) -> None:
        self._index += 1
        # The caller's key may be known only now (a library caller's, loaded by the
        # accounting hook after the router trimmed the chain): see usable_chain.
        while self._index < len(self._groups) and not self._may_fall_back_to(self._groups[self._index]):
            self._index += 1
        if self._index >= len(self._groups):
            return
        following = self._groups[self._index]
        self.ctx.fallbacks += 1
        _notify(self._hooks, "on_fallback", self.ctx, group.name, following.name)
        self._tried, self._exhausted = [], []
        self._not_before = {}
        self._attempts_left = following.retry.attempts + 1

    def _may_fall_back_to(self, group: GroupState) -> bool:
        """The caller's key may use ``group``, and it is still among the request's
        fallbacks (``ctx.fallback_groups``: accounting passes over one whose per-model
        budget cannot take the request)."""
        return may_use(self.ctx, group) and group.name in self.ctx.fallback_groups

    def failed(self, group: GroupState, deployment: DeploymentState, error: LLMRouterError) -> None:
        """Record a failed attempt; re-raises when the request itself is at fault."""
        self._last_error = error
        _notify(self._hooks, "on_attempt", self.ctx, deployment.id, error)
        if is_request_fault(error):
            raise error
        if (
            group.direct
            and isinstance(error, UpstreamModelNotFoundError)
            and error.model == deployment.config.model
        ):
            # The client typed the name: a model the upstream does not have is its 404,
            # not a failure of the name (cooled down, it would answer 503, "try later").
            # Not so for another id the deployment sends (a provider's fallback_models):
            # the operator's, a failure like a configured deployment's.
            raise ModelNotFoundError(error.message, param="model", provider=error.provider) from error
        if not is_mismatch(error):
            # A refusal must not cool a deployment down: three requests with `n: 2`
            # would take it from everyone.
            _record_failure(group, deployment, self._hooks)
        self._tried.append(deployment)
        if not error.retryable:
            self._exhausted.append(deployment)
            return
        self._not_before[deployment] = time.monotonic() + self._backoff(group, deployment, error)

    def _backoff(self, group: GroupState, deployment: DeploymentState, error: LLMRouterError) -> float:
        """Seconds ``deployment`` rests before its next try: the upstream's ``Retry-After``
        (capped), else full jitter over an exponential of its own tries so far."""
        if error.retry_after is not None:
            return min(error.retry_after, group.retry.backoff_max)
        tries = self._tried.count(deployment)
        return random.uniform(0, min(group.retry.backoff_max, group.retry.backoff_base * 2 ** (tries - 1)))

    def succeeded(self, deployment: DeploymentState) -> None:
        _notify(self._hooks, "on_attempt", self.ctx, deployment.id, None)

    def cancelled(self, deployment: DeploymentState) -> None:
        """Report an attempt its caller cut short (see :class:`AttemptCancelledError`);
        unlike :meth:`failed`, the deployment is not judged by it."""
        error = AttemptCancelledError(f"the call to deployment {deployment.id!r} was cancelled")
        _notify(self._hooks, "on_attempt", self.ctx, deployment.id, error)


def _notify(hooks: Sequence[RouterHooks], event: str, *args: Any) -> None:
    """Call the event method ``event`` (``on_attempt``, ``on_first_token``...) of every hook.

    Events only observe: one that raises (a metrics exporter down) is logged and the
    request goes on as if it had not. Raised here, it failed a request the upstream had
    answered, and the ledger billed nothing for it.
    """
    for hook in hooks:
        try:
            getattr(hook, event)(*args)
        except Exception:
            logger.exception("hook %r failed in %s", hook, event)


def _record_failure(group: GroupState, deployment: DeploymentState, hooks: Sequence[RouterHooks]) -> None:
    """Count a failure of ``deployment``; report the cooldown it may start."""
    if deployment.record_failure(group.cooldown):
        logger.warning(
            "deployment %s cooling down for %.0fs after repeated failures",
            deployment.id,
            group.cooldown.seconds,
        )
        _notify(hooks, "on_cooldown", deployment.id, group.cooldown.seconds)


def _for_deployment(request: Req, deployment: DeploymentState) -> Req:
    if getattr(request, "model", None) == deployment.config.model:
        return request
    return msgspec.structs.replace(request, model=deployment.config.model)


def _commit(ctx: RequestContext, group: GroupState, deployment: DeploymentState) -> None:
    ctx.model_group = group.name
    ctx.deployment = deployment.id
    ctx.provider = deployment.config.provider
    ctx.upstream_model = deployment.config.model


def _first_token(ctx: RequestContext, hooks: Sequence[RouterHooks]) -> None:
    ctx.first_token_at = time.perf_counter()
    _notify(hooks, "on_first_token", ctx)


def _record_timeout(deployment: DeploymentState, exc: Exception, started: float, limit: float | None) -> None:
    """Count an attempt our own ``limit`` cut (a bare ``TimeoutError``) in the
    deployment's latency averages (see :meth:`DeploymentState.record_timeout`): it took
    at least that long, whatever the clocks say. An upstream's 504 or 408 is not: one
    answered at once (a gateway's) would make a failing deployment look fast."""
    if limit is not None and isinstance(exc, TimeoutError):
        deployment.record_timeout(max(time.perf_counter() - started, limit))


async def dispatch_call(
    ctx: RequestContext,
    groups: Sequence[GroupState],
    hooks: Sequence[RouterHooks],
    request: Req,
    method: Callable[[Provider[Any], Req], Awaitable[R]],
) -> R:
    """Run a non-streaming call (``chat`` / ``complete``) with retries and fallbacks."""
    plan = AttemptPlan(ctx, groups, hooks, request, stream=False)
    while True:
        group, deployment = await plan.next()
        timeout = group.timeouts_for(deployment).total
        group.acquire(deployment)
        token = current_context.set(ctx)
        started = time.perf_counter()
        try:
            async with time_limit(timeout):
                result = await method(deployment.provider, _for_deployment(request, deployment))
        except Exception as exc:  # noqa: BLE001 - translated and judged by the plan
            error = as_router_error(exc, deployment)
            _record_timeout(deployment, exc, started, timeout)
            plan.failed(group, deployment, error)
            continue
        except BaseException:
            _commit(ctx, group, deployment)  # cancelled mid-call: billed the prompt sent here
            plan.cancelled(deployment)
            raise
        finally:
            current_context.reset(token)
            group.release(deployment)
        elapsed = time.perf_counter() - started
        deployment.record_ttft(elapsed)
        deployment.record_success(elapsed)
        _commit(ctx, group, deployment)  # before the hooks, which may read it
        plan.succeeded(deployment)
        _first_token(ctx, hooks)
        return result


async def _close_quietly(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_GRACE_S):
        try:
            await aclose()
        except Exception as exc:  # noqa: BLE001 - the stream is being abandoned anyway
            logger.debug("closing an upstream stream raised %r", exc)


def _check_deadline(deadline: float | None, deployment: DeploymentState) -> None:
    # The total timeout of a stream that is producing is checked between chunks: a cancel
    # scope cannot span the generator's yields, and one scope per chunk cost ~14% of the
    # gateway's CPU on a 20-chunk stream. A stream that goes silent is bounded by the
    # first-token timeout (first chunk) and by the provider's own read timeout after it.
    if deadline is not None and time.monotonic() > deadline:
        raise UpstreamTimeoutError(
            f"deployment {deployment.id!r} exceeded the total timeout", provider=deployment.config.provider
        )


def _cut_short(
    plan: AttemptPlan, deployment: DeploymentState, last: Any, started: float, answers: int
) -> None:
    """End a stream's attempt that its caller cut short (cancelled, or closed the stream).

    One whose last chunk received ended the answer (the usage chunk after it; or, for one
    answer, a finish reason) delivered everything: a success, whether or not the
    upstream's end of stream was read. Otherwise it is reported cancelled. With several
    answers (``n``), one choice's finish says nothing of the others, still streaming."""
    if last is not None and _ends_answer(last, answers):
        deployment.record_success(time.perf_counter() - started)
        plan.succeeded(deployment)
    else:
        plan.cancelled(deployment)


def _ends_answer(chunk: Any, answers: int) -> bool:
    choices = getattr(chunk, "choices", None)
    if not choices:
        return getattr(chunk, "usage", None) is not None
    return answers == 1 and all(getattr(choice, "finish_reason", None) is not None for choice in choices)


async def dispatch_stream(
    ctx: RequestContext,
    groups: Sequence[GroupState],
    hooks: Sequence[RouterHooks],
    request: Req,
    method: Callable[[Provider[Any], Req], AsyncIterator[C]],
) -> AsyncIterator[C]:
    """Stream from the first deployment that produces a first chunk in time."""
    plan = AttemptPlan(ctx, groups, hooks, request, stream=True)
    while True:
        group, deployment = await plan.next()
        timeouts = group.timeouts_for(deployment)
        started = time.perf_counter()
        deadline = None if timeouts.total is None else time.monotonic() + timeouts.total
        first_wait = timeouts.first_token
        if timeouts.total is not None:
            first_wait = timeouts.total if first_wait is None else min(first_wait, timeouts.total)
        group.acquire(deployment)
        token: Token[RequestContext | None] | None = current_context.set(ctx)
        stream: AsyncIterator[C] | None = None
        chunk: C | None = None  # the last chunk received, for a stream cut short
        try:
            try:
                # Inside the try: a provider whose ``stream`` is a plain method may raise on
                # call (the base class's ``stream_complete`` does), and the slot and the
                # context variable must still be given back.
                stream = method(deployment.provider, _for_deployment(request, deployment))
                async with time_limit(first_wait):
                    first = await stream.__anext__()
            except StopAsyncIteration:
                error: LLMRouterError = UpstreamError(
                    f"deployment {deployment.id!r} returned an empty stream",
                    provider=deployment.config.provider,
                )
                plan.failed(group, deployment, error)
                continue
            except Exception as exc:  # noqa: BLE001 - translated and judged by the plan
                error = as_router_error(exc, deployment)
                _record_timeout(deployment, exc, started, first_wait)
                plan.failed(group, deployment, error)
                continue
            deployment.record_ttft(time.perf_counter() - started)
            _commit(ctx, group, deployment)
            _first_token(ctx, hooks)
            if token is not None:  # the provider call has started; the context var is done
                current_context.reset(token)
                token = None
            chunk = first
            yield first
            while True:
                try:
                    chunk = await stream.__anext__()
                    _check_deadline(deadline, deployment)
                except StopAsyncIteration:
                    break
                except Exception as exc:  # mid-stream: no retry, report and end
                    error = as_router_error(exc, deployment)
                    _record_failure(group, deployment, hooks)
                    _notify(hooks, "on_attempt", ctx, deployment.id, error)
                    raise error from exc
                yield chunk
            deployment.record_success(time.perf_counter() - started)
            plan.succeeded(deployment)
            return
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled, or closed by its consumer
                _commit(ctx, group, deployment)  # cut before its first chunk: billed the prompt
                _cut_short(plan, deployment, chunk, started, getattr(request, "n", None) or 1)
            raise
        finally:
            if token is not None:
                current_context.reset(token)
            if stream is not None:
                await _close_quietly(stream)
            group.release(deployment)
