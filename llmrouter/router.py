"""The Router: model groups -> deployments -> strategy -> retry / fallback.

For each request the router resolves the model name to a group (or an ad-hoc
``provider/model`` deployment), estimates its most possible cost, asks the hooks to
admit it (auth scope, limits, budget reservation), passes it through the cache layer
when one is set, dispatches it (``llmrouter.dispatch``), fills in usage and cost, and
lets the hooks settle and record it. Cancelling the caller cancels the provider call.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from functools import partial
from typing import Any, TypeVar

import anyio
import msgspec

from llmrouter.aio import to_completion
from llmrouter.config import Config, Deployment, ModelGroup
from llmrouter.context import RequestContext
from llmrouter.cost import PriceTable, max_cost, usage_cost
from llmrouter.counting import estimate_prompt, estimated_usage
from llmrouter.deployments import DeploymentState, GroupState
from llmrouter.dispatch import dispatch_call, dispatch_stream, usable_chain
from llmrouter.errors import ConfigError, LLMRouterError, ModelNotFoundError
from llmrouter.hooks import CacheLayer, RouterHooks
from llmrouter.probes import SharedProbes, probe_deployment
from llmrouter.provider import Provider
from llmrouter.registry import available_providers, load_provider_class
from llmrouter.strategies import get_strategy
from llmrouter.tokens import preload_encodings
from llmrouter.types import (
    MOST_CHOICES,
    MOST_TOKENS,
    AssistantMessage,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    decode_chat_request,
    decode_completion_request,
    request_to_wire,
)

__all__ = ["Router"]

logger = logging.getLogger("llmrouter.router")

R = TypeVar("R", ChatResponse, CompletionResponse)
Q = TypeVar("Q", ChatRequest, CompletionRequest)
_OpenStream = tuple[RequestContext, Callable[[], AsyncIterator[Any]], bool]
"""An admitted streaming request: its context, what opens its chunks, and whether the
client asked for the usage chunk."""

_MAX_DIRECT_NAME = 256
"""The longest ``provider/model`` name served directly (model ids run to ~100 characters)."""

_CLOSE_GRACE_S = 5.0
"""How long closing an evicted direct deployment's provider may take."""


class Router:
    """Routes OpenAI-style requests to model deployments.

    Args:
        config: models, router policies and prices; ``None`` starts empty.
        hooks: request hooks (accounting, telemetry, logs), called in order.
        cache: a cache layer wrapping chat dispatch (see ``llmrouter.cache``).

    Example::

        async with Router(load_config("llmrouter.yaml")) as router:
            reply = await router.chat({"model": "gpt", "messages": [{"role": "user", "content": "Hi"}]})
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        hooks: Sequence[RouterHooks] = (),
        cache: CacheLayer | None = None,
    ) -> None:
        self.config = config or Config()
        self.hooks: list[RouterHooks] = list(hooks)
        self._cache: CacheLayer | None = None
        self.prices = PriceTable(self.config.pricing)
        self._groups: dict[str, GroupState] = {}
        self._names: dict[str, str] = {}
        self._by_id: dict[str, DeploymentState] = {}
        self._direct: dict[str, GroupState] = {}
        """The ad-hoc ``provider/model`` groups clients named, oldest first."""
        self._probes = SharedProbes()
        self._started = False
        self._pending: dict[DeploymentState, None] = {}
        """Deployments whose provider's ``start()`` has not been tried (since the last
        :meth:`aclose`): every one added, whenever it is added. A request checks only that
        this is empty; when it is not, it starts those it may be sent to first."""
        self._starting: dict[DeploymentState, anyio.Event] = {}
        self._closing: list[Provider[Any]] = []
        """Providers of evicted direct groups, closed on the next start or at :meth:`aclose`."""
        self._holding: dict[int, list[GroupState]] = {}
        """The direct groups each request in progress holds (``GroupState.admitted``), by
        ``id()`` of its context, from its admission to its settlement."""
        for group in self.config.models:
            self.add_group(group)
        self.cache = cache

    @classmethod
    def from_config(
        cls, config: Config, *, hooks: Sequence[RouterHooks] = (), cache: CacheLayer | None = None
    ) -> Router:
        return cls(config, hooks=hooks, cache=cache)

    # --- building ----------------------------------------------------------------------

    @property
    def cache(self) -> CacheLayer | None:
        """The cache layer around chat dispatch (None: no caching)."""
        return self._cache

    @cache.setter
    def cache(self, layer: CacheLayer | None) -> None:
        self._cache = layer
        if layer is not None:
            for group in self._groups.values():
                if group.config.cache is not None:  # not to undo the layer's own settings
                    layer.configure_group(group.name, group.config.cache)

    @property
    def groups(self) -> dict[str, GroupState]:
        return self._groups

    @property
    def deployments(self) -> list[DeploymentState]:
        return [d for group in self._groups.values() for d in group.deployments]

    def add_group(self, group: ModelGroup) -> GroupState:
        """Add a model group from config, building a provider for each deployment.

        The providers are built first: a group whose deployment cannot be built is not
        registered at all (no name without a way to serve it). Added to a started router,
        its providers are started by the first request that may use them.
        """
        return self._add_group(group)

    def _add_group(self, group: ModelGroup, *, direct: bool = False) -> GroupState:
        timeouts = group.timeouts or self.config.router.timeouts
        providers = []
        for index, deployment in enumerate(group.deployments):
            options = {**self.config.providers.get(deployment.provider, {}), **deployment.options}
            provider_class = load_provider_class(deployment.provider)
            if (
                "connect_timeout" in provider_class.Options.__struct_fields__
                and "connect_timeout" not in options
            ):
                # timeouts.connect (deployment, group or router) reaches HTTP providers as their
                # connect timeout, unless the deployment sets the provider's own option.
                options["connect_timeout"] = (deployment.timeouts or timeouts).connect
            path = f"models[{group.name}].deployments[{index}]"
            providers.append(provider_class.from_config(deployment.model, options, path=path))
        state = self._new_group(group, direct=direct)
        for provider, deployment in zip(providers, group.deployments, strict=True):
            self._add_state(state, provider, deployment)
        return state

    def add_deployment(
        self, group_name: str, provider: Provider[Any], deployment: Deployment | None = None
    ) -> DeploymentState:
        """Serve ``group_name`` with an existing provider instance (the group is created if
        new). Added to a started router, the provider is started by the first request that
        may use it."""
        deployment = deployment or Deployment(
            provider=provider.name or type(provider).__name__, model=provider.model
        )
        state = self._groups.get(group_name) or self._new_group(ModelGroup(name=group_name, deployments=[]))
        return self._add_state(state, provider, deployment)

    def _new_group(self, group: ModelGroup, *, direct: bool = False) -> GroupState:
        for name in (group.name, *group.aliases):
            if name in self._names:
                raise ConfigError(f"model name {name!r} is already defined")
        defaults = self.config.router
        state = GroupState(
            name=group.name,
            config=group,
            strategy=get_strategy(group.strategy or defaults.strategy),
            retry=group.retry or defaults.retry,
            timeouts=group.timeouts or defaults.timeouts,
            cooldown=group.cooldown or defaults.cooldown,
            direct=direct,
        )
        self._groups[group.name] = state
        for name in (group.name, *group.aliases):
            self._names[name] = group.name
        if self._cache is not None and not direct and group.cache is not None:
            # A group without settings keeps what the layer was told (configure_group
            # before the router was built); a direct group has none, and it may be
            # evicted: its name must not stay behind in the layer.
            self._cache.configure_group(group.name, group.cache)
        return state

    def _add_state(
        self, group: GroupState, provider: Provider[Any], deployment: Deployment
    ) -> DeploymentState:
        base_id = deployment.id or f"{deployment.provider}/{deployment.model}"
        dep_id, n = base_id, 1
        while dep_id in self._by_id:
            n += 1
            dep_id = f"{base_id}#{n}"
        price = self.prices.lookup(
            provider=deployment.provider, model=deployment.model, group=group.name, own=deployment.price
        )
        state = DeploymentState(
            id=dep_id,
            group=group.name,
            index=len(group.deployments),
            config=deployment,
            provider=provider,
            price=price,
        )
        group.deployments.append(state)
        self._by_id[dep_id] = state
        self._pending[state] = None
        return state

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start every provider not started yet (concurrently). A provider that fails to
        start is logged and taken out of rotation; the router still serves the others.

        Calling it is optional: the first request starts the router, and a deployment
        added later (:meth:`add_group`, :meth:`add_deployment`, a direct ``provider/model``
        name) is started by the first request that may use it.
        """
        preload = not self._started
        self._started = True
        pending = list(self._pending)
        if not (pending or preload):
            return
        async with anyio.create_task_group() as tg:
            for deployment in pending:
                tg.start_soon(self._start_deployment, deployment)
            # Priced deployments count every prompt (for the budget reservation).
            priced = [d.config.model for d in self.deployments if d.price is not None] if preload else []
            if priced:
                tg.start_soon(
                    partial(anyio.to_thread.run_sync, preload_encodings, priced, abandon_on_cancel=True)
                )

    async def _start_needed(self, groups: list[GroupState]) -> None:
        """Start the deployments of ``groups`` that are not started yet (the first request,
        or deployments added since): the request path's slow branch, taken only while
        some deployment waits for its start."""
        if self._closing:
            await self._close_evicted()
        if not self._started:
            await self.start()
        needed = [d for group in groups for d in group.deployments if d in self._pending]
        if needed:
            async with anyio.create_task_group() as tg:
                for deployment in needed:
                    tg.start_soon(self._start_deployment, deployment)

    async def _start_deployment(self, deployment: DeploymentState) -> None:
        """Try ``deployment``'s start once (concurrent callers wait for that one try).

        One that failed stays out until :meth:`aclose`: tried again on every request, a
        slow provider's start would hold each request for it behind it."""
        while deployment in self._pending:
            starting = self._starting.get(deployment)
            if starting is not None:
                # Another task is starting it; if that task is cancelled mid-start, the
                # deployment is still pending and this one tries.
                await starting.wait()
                continue
            starting = self._starting[deployment] = anyio.Event()
            try:
                try:
                    await deployment.provider.start()
                    # Read once started: a provider learns some (its context window) there.
                    capabilities = deployment.provider.capabilities
                    deployment.limits = None if capabilities.serves_all else capabilities
                except Exception as exc:  # noqa: BLE001 - one bad deployment must not stop the rest
                    deployment.start_error = f"{type(exc).__name__}: {exc}"
                    logger.error("deployment %s failed to start: %s", deployment.id, deployment.start_error)
                else:
                    deployment.started = True
                self._pending.pop(deployment, None)
            finally:
                del self._starting[deployment]
                starting.set()

    async def _close_evicted(self) -> None:
        closing, self._closing = self._closing, []
        with anyio.move_on_after(_CLOSE_GRACE_S, shield=True):
            for provider in closing:
                try:
                    await provider.aclose()
                except Exception as exc:  # noqa: BLE001 - keep closing the others
                    logger.warning("closing %s/%s raised %r", provider.name, provider.model, exc)

    async def aclose(self) -> None:
        """Close every provider. The router may be started again afterwards: every
        deployment is then started afresh, one that failed to start before included."""
        with anyio.CancelScope(shield=True):
            for deployment in self.deployments:
                try:
                    await deployment.provider.aclose()
                except Exception as exc:  # noqa: BLE001 - keep closing the others
                    logger.warning("closing %s raised %r", deployment.id, exc)
                deployment.started = False
                deployment.start_error = None
                self._pending[deployment] = None
            if self._closing:
                await self._close_evicted()
        self._started = False

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- resolution --------------------------------------------------------------------

    def resolve(self, model: str) -> list[GroupState]:
        """The group serving ``model`` followed by its fallback groups."""
        name = self._names.get(model)
        if name is None:
            group = self._direct_group(model)
        else:
            group = self._groups[name]
        chain = [group]
        for fallback in group.config.fallbacks:
            following = self._groups.get(self._names.get(fallback, fallback))
            if following is not None and following not in chain:
                chain.append(following)
        return chain

    def _direct_group(self, model: str) -> GroupState:
        if len(model) > _MAX_DIRECT_NAME or not model.isprintable():
            # No model id holds control characters (a NUL, a newline): refused before
            # anything is made for it, as are names no model id is as long as.
            raise _model_not_found(model)
        provider, _, upstream = model.partition("/")
        if not (self.config.router.allow_direct and upstream and provider in available_providers()):
            raise _model_not_found(model)
        # Only providers whose models are cheap to name (a daemon's or an API's) may be
        # addressed directly: a client must not make the server load a local model or
        # start an engine (transformers, vllm), or reach a server nobody configured.
        if not load_provider_class(provider).direct:
            raise _model_not_found(model)
        limit = self.config.router.max_direct_models
        if len(self._direct) >= limit and not (limit and self._evict_direct()):
            logger.warning(
                "direct model %r refused: router.max_direct_models (%d) are in use; configure it as a group",
                model[:100],
                limit,
            )
            raise _model_not_found(model)
        try:
            group = self._add_group(
                ModelGroup(name=model, deployments=[Deployment(provider=provider, model=upstream)]),
                direct=True,
            )
        except LLMRouterError as exc:
            logger.info("direct model %r cannot be served: %s", model, exc.message)
            raise _model_not_found(model) from exc
        self._direct[model] = group
        return group

    def _evict_direct(self) -> bool:
        """Make room for a new direct name: drop the oldest direct group that never
        served a request and holds no admitted one, one whose requests failed (an unknown
        model, a daemon not running) before one never used. False when every slot holds
        a model that has served or a request in progress: those are kept.

        Without this, one client's made-up names would take every slot for good, and
        direct routing would be gone for every client."""
        unused: GroupState | None = None
        for group in self._direct.values():
            # An admitted request may be in its hooks, its cost bound or the cache
            # lookup, not in flight yet: evicted, it would be sent to a closed provider.
            if group.admitted or not all(map(_idle_and_unproven, group.deployments)):
                continue
            if any(d.failures or d.start_error is not None for d in group.deployments):
                self._remove_direct(group)
                return True
            unused = unused or group
        if unused is None:
            return False
        self._remove_direct(unused)
        return True

    def _hold_direct(self, ctx: RequestContext, groups: list[GroupState]) -> None:
        """Keep the direct groups of ``ctx``'s chain from eviction until it is settled
        (:meth:`_release_direct`)."""
        held = [group for group in groups if self._direct.get(group.name) is group]
        if held:
            for group in held:
                group.admitted += 1
            self._holding[id(ctx)] = held

    def _release_direct(self, ctx: RequestContext) -> None:
        for group in self._holding.pop(id(ctx), ()):
            group.admitted -= 1

    def _remove_direct(self, group: GroupState) -> None:
        logger.info("direct model %r evicted to make room for another", group.name[:100])
        del self._direct[group.name]
        del self._groups[group.name]
        del self._names[group.name]
        for deployment in group.deployments:
            if self._by_id.get(deployment.id) is deployment:
                del self._by_id[deployment.id]
            self._closing.append(deployment.provider)
        # Its readiness probes would otherwise stay for good, one more for each name.
        self._probes.forget(d.id for d in group.deployments if d.id not in self._by_id)

    # --- requests ----------------------------------------------------------------------

    async def chat(
        self, request: ChatRequest | dict[str, Any], *, context: RequestContext | None = None
    ) -> ChatResponse:
        """One chat completion (``stream`` in the request is ignored; use :meth:`stream`)."""
        decoded = _chat_request(request)
        ctx, groups, decoded = await self._admit(decoded, context, operation="chat", stream=False)

        def dispatch() -> Awaitable[ChatResponse]:
            return dispatch_call(ctx, groups, self.hooks, decoded, _provider_chat)

        cache = self.cache
        call = dispatch if cache is None else partial(cache.chat, ctx, decoded, dispatch)
        return await self._settled(ctx, call, _response_text)

    def stream(
        self, request: ChatRequest | dict[str, Any], *, context: RequestContext | None = None
    ) -> AsyncGenerator[ChatChunk, None]:
        """Stream a chat completion as chunks; a final usage chunk only when the request
        asks for ``stream_options.include_usage``. Nothing happens (no admission) until
        the first chunk is asked for."""
        return self._relay(partial(self._open_stream, request, context))

    async def _open_stream(
        self, request: ChatRequest | dict[str, Any], context: RequestContext | None
    ) -> _OpenStream:
        decoded = _chat_request(request)
        ctx, groups, decoded = await self._admit(decoded, context, operation="chat", stream=True)

        def dispatch() -> AsyncIterator[ChatChunk]:
            return dispatch_stream(ctx, groups, self.hooks, decoded, _provider_stream)

        cache = self.cache
        source = dispatch if cache is None else partial(cache.stream, ctx, decoded, dispatch)
        return ctx, source, _wants_usage(decoded)

    async def complete(
        self, request: CompletionRequest | dict[str, Any], *, context: RequestContext | None = None
    ) -> CompletionResponse:
        """One legacy prompt completion (``/v1/completions``)."""
        decoded = _completion_request(request)
        ctx, groups, decoded = await self._admit(decoded, context, operation="completion", stream=False)
        call = partial(dispatch_call, ctx, groups, self.hooks, decoded, _provider_complete)
        return await self._settled(ctx, call, lambda response: "".join(c.text for c in response.choices))

    def stream_complete(
        self, request: CompletionRequest | dict[str, Any], *, context: RequestContext | None = None
    ) -> AsyncGenerator[CompletionChunk, None]:
        """Stream a legacy prompt completion."""
        return self._relay(partial(self._open_completion_stream, request, context))

    async def _open_completion_stream(
        self, request: CompletionRequest | dict[str, Any], context: RequestContext | None
    ) -> _OpenStream:
        decoded = _completion_request(request)
        ctx, groups, decoded = await self._admit(decoded, context, operation="completion", stream=True)
        source = partial(dispatch_stream, ctx, groups, self.hooks, decoded, _provider_stream_complete)
        return ctx, source, _wants_usage(decoded)

    async def _settled(
        self, ctx: RequestContext, call: Callable[[], Awaitable[R]], text_of: Callable[[R], str]
    ) -> R:
        """Run a non-streaming call, then fill usage (counted if the answer had none) and settle."""
        try:
            response = await call()
            if ctx.usage is None:
                # The answer exists: counting it must finish even if the caller is cancelled
                # now, or a completed call would be billed nothing.
                if response.usage is not None:
                    ctx.usage = response.usage
                else:
                    await to_completion(_fill_usage(ctx, text_of(response)))
            ctx.status = "ok"
            return response
        except BaseException as exc:
            _record_failure(ctx, exc)
            raise
        finally:
            try:
                if ctx.usage is None and ctx.deployment is not None:
                    # Cancelled while its upstream call ran: the upstream has read the prompt
                    # (counted as a stream cut before its first chunk is).
                    await to_completion(_fill_usage(ctx, ""))
            finally:
                await self._finish(ctx)

    async def _relay(self, open_stream: Callable[[], Awaitable[_OpenStream]]) -> AsyncGenerator[Any, None]:
        """Admit the request (``open_stream``), then pass its chunks on, keep usage for
        billing, and remember the text for partial billing.

        The stream methods return this generator itself: one around the source would
        cost every chunk another generator step (~2k CPU instructions)."""
        ctx, make_source, include_usage = await open_stream()
        pieces: list[str] = []
        chunk_hooks = [hook for hook in self.hooks if _overrides(hook, "on_chunk")]
        # Telemetry made ctx.chunk_times in before_request when it wants the chunks timed.
        note_time = ctx.chunk_times.append if ctx.chunk_times is not None else None
        now = time.perf_counter
        try:
            source = make_source()
            async with aclosing(source):  # type: ignore[type-var]
                async for chunk in source:
                    if chunk.usage is not None:
                        ctx.usage = chunk.usage
                        if not include_usage:
                            if not chunk.choices:
                                continue
                            chunk = msgspec.structs.replace(chunk, usage=None)
                    for choice in chunk.choices:
                        text = choice.delta.content if isinstance(chunk, ChatChunk) else choice.text
                        if text:
                            pieces.append(text)
                    if note_time is not None:
                        note_time(now())
                    for hook in chunk_hooks:
                        try:
                            hook.on_chunk(ctx)
                        except Exception:  # an event hook never changes the outcome
                            logger.exception("hook %r failed in on_chunk", hook)
                    yield chunk
            ctx.status = "ok"
        except BaseException as exc:
            _record_failure(ctx, exc)
            raise
        finally:
            try:
                if ctx.usage is None and (pieces or ctx.deployment is not None):
                    await to_completion(_fill_usage(ctx, "".join(pieces)))
            finally:
                await self._finish(ctx)

    async def _admit(
        self, request: Q, context: RequestContext | None, *, operation: str, stream: bool
    ) -> tuple[RequestContext, list[GroupState], Q]:
        if context is None:
            ctx = RequestContext()
        elif context.request is not None:
            raise _used_context(context)
        else:
            ctx = context
        ctx.operation = operation  # type: ignore[assignment]
        ctx.stream = stream
        ctx.request = request
        ctx.model_group = request.model
        try:
            groups = usable_chain(ctx, self.resolve(request.model))
            ctx.model_group = groups[0].name
            if len(groups) > 1:
                ctx.fallback_groups = tuple(group.name for group in groups[1:])
            if self._direct:
                self._hold_direct(ctx, groups)
            if self._pending:
                await self._start_needed(groups)
            request = await self._bound_cost(ctx, groups, request)
        except BaseException as exc:
            if self._holding:
                self._release_direct(ctx)
            if isinstance(exc, LLMRouterError):
                _record_failure(ctx, exc)
                self._rejected(ctx, exc)
            raise
        admitted: list[RouterHooks] = []
        try:
            for hook in self.hooks:
                await hook.before_request(ctx)
                admitted.append(hook)
        except BaseException as exc:
            _record_failure(ctx, exc)
            ctx.finished_at = time.perf_counter()
            await self._after(ctx, admitted)
            if isinstance(exc, LLMRouterError):
                self._rejected(ctx, exc)
            raise
        return ctx, groups, request

    async def _bound_cost(self, ctx: RequestContext, groups: list[GroupState], request: Any) -> Any:
        """Estimate prompt tokens, the most the request can cost and what its prompt alone
        costs (0 when unpriced).

        A priced request without an output limit gets ``router.default_max_tokens``, so
        that a budget reservation really is the maximum: a chat request as
        ``max_completion_tokens`` (OpenAI's reasoning models refuse ``max_tokens``).
        """
        prices = [d.price for g in groups for d in g.deployments if d.price is not None]
        if not prices:
            ctx.max_cost = 0.0
            return request
        model = groups[0].deployments[0].config.model if groups[0].deployments else request.model
        ctx.prompt_tokens_estimate = await estimate_prompt(request, model)
        limit = request.output_limit
        if limit is None:
            limit = self.config.router.default_max_tokens
            if isinstance(request, ChatRequest):
                request = msgspec.structs.replace(request, max_completion_tokens=limit)
            else:
                request = msgspec.structs.replace(request, max_tokens=limit)
            ctx.request = request
        output = limit * _choices(request)  # each of n answers may use the whole limit
        ctx.max_cost = max(max_cost(ctx.prompt_tokens_estimate, output, price) for price in prices)
        ctx.prompt_cost_estimate = max(max_cost(ctx.prompt_tokens_estimate, 0, price) for price in prices)
        return request

    def _rejected(self, ctx: RequestContext, error: LLMRouterError) -> None:
        for hook in self.hooks:
            try:
                hook.on_rejected(ctx, error)
            except Exception:
                logger.exception("hook %r failed in on_rejected", hook)

    async def _finish(self, ctx: RequestContext) -> None:
        ctx.finished_at = time.perf_counter()
        self._settle_cost(ctx)
        await self._after(ctx, self.hooks)

    async def _after(self, ctx: RequestContext, hooks: Sequence[RouterHooks]) -> None:
        """The end of every admitted request (settled, or refused by a hook)."""
        if self._holding:
            # Its cost is settled: its direct groups may be evicted (and its deployment
            # leave ``_by_id``, which prices it) from now on.
            self._release_direct(ctx)
        if not hooks:
            return
        if all(map(_settles_inline, hooks)):
            await _run_after_hooks(ctx, hooks)  # nothing in them waits: no cancellation reaches them
        else:
            # Settlement (ledger rows, limits, budgets) must finish even for a caller
            # that is being cancelled.
            await to_completion(_run_after_hooks(ctx, hooks))

    def _settle_cost(self, ctx: RequestContext) -> None:
        if ctx.cost_source == "cache" or ctx.usage is None:
            if ctx.cost is None and ctx.usage is None:
                ctx.cost = 0.0
            return
        if ctx.usage.estimated:  # counted here or by the provider
            ctx.usage = _within_limit(ctx.usage, ctx.request)
        ctx.usage = _counts_in_range(ctx.usage)
        reported = ctx.usage.cost
        # A negative, infinite or NaN figure is no cost: billed from the price table instead
        # (a negative one would lower the key's spend in every report).
        if reported is not None and 0 <= reported < math.inf:
            ctx.cost, ctx.cost_source = reported, "provider"
            return
        deployment = self._by_id.get(ctx.deployment) if ctx.deployment is not None else None
        price = deployment.price if deployment is not None else None
        if price is None:
            ctx.cost, ctx.cost_source = 0.0, "unpriced"
        else:
            ctx.cost, ctx.cost_source = usage_cost(ctx.usage, price), "price_table"

    # --- introspection -----------------------------------------------------------------

    async def list_models(self, allows: Callable[[str, str], bool] | None = None) -> ModelList:
        """Every model name clients can use: group names and aliases; with ``allows``,
        those for which ``allows(name, group)`` is true."""
        names = self._names
        if self._direct:
            # A direct name that has served nothing (a typo, a model the daemon lacks) is
            # not offered to clients: it is only a client's guess.
            unproven = {name for name, group in self._direct.items() if not _has_served(group)}
            names = {name: group for name, group in names.items() if name not in unproven}
        visible = names if allows is None else [name for name, group in names.items() if allows(name, group)]
        return ModelList(data=[ModelCard(id=name, created=0) for name in visible])

    async def readiness(self, *, probe: bool = True) -> dict[str, Any]:
        """Per-deployment state; with ``probe``, each provider's ``health()`` (2 s bound),
        shared with concurrent callers and reused for a second (:mod:`llmrouter.probes`)."""
        now = time.monotonic()
        snapshots = {d.id: d.snapshot(now) for d in self.deployments}
        if probe:

            async def fill(deployment: DeploymentState) -> None:
                result = await self._probes.result(deployment.id, partial(probe_deployment, deployment))
                snapshots[deployment.id].update(result)

            async with anyio.create_task_group() as tg:
                for deployment in self.deployments:
                    tg.start_soon(fill, deployment)
        ready = any(s["healthy"] and s.get("reachable", True) for s in snapshots.values())
        return {"ready": ready, "deployments": list(snapshots.values())}


_settles_inline = operator.attrgetter("settles_inline")


def _idle_and_unproven(deployment: DeploymentState) -> bool:
    return deployment.in_flight == 0 and deployment.requests <= deployment.failures


def _has_served(group: GroupState) -> bool:
    return any(d.requests > d.failures for d in group.deployments)


def _used_context(ctx: RequestContext) -> ValueError:
    return ValueError(
        f"RequestContext {ctx.request_id!r} was already used for a request: a context records "
        "one request (its usage, cost and status); pass a new RequestContext to each call"
    )


def _chat_request(request: ChatRequest | dict[str, Any]) -> ChatRequest:
    """``request`` decoded and validated; a struct as it is when the fields the router
    computes with are sound.

    A struct built in code skips msgspec's constraints (only decoding checks them): one
    with an output limit under 1 would reserve a negative budget. Decoded structs (the
    service's) are sound, so the check costs them a few attribute reads (inline: this is
    every request's path), not a second decoding; one that fails it is decoded as the
    dict it encodes, for the error (and its ``param``) a dict would get.
    """
    if isinstance(request, ChatRequest):
        limit, most, n = request.max_tokens, request.max_completion_tokens, request.n
        if (
            request.messages
            and request.model
            and (limit is None or (type(limit) is int and 0 < limit <= MOST_TOKENS))
            and (most is None or (type(most) is int and 0 < most <= MOST_TOKENS))
            and (n is None or (type(n) is int and 0 < n <= MOST_CHOICES))
            # An answer's message sent back as is (a library caller's conversation) would
            # write its null content and refusal upstream, and key the cache apart from
            # the same conversation sent over HTTP: decoded, it is a request's message.
            and AssistantMessage not in map(type, request.messages)
        ):
            return request
        return decode_chat_request(request_to_wire(request))
    return decode_chat_request(request)


def _completion_request(request: CompletionRequest | dict[str, Any]) -> CompletionRequest:
    """``request`` decoded and validated (see :func:`_chat_request`)."""
    if isinstance(request, CompletionRequest):
        limit, best_of, n = request.max_tokens, request.best_of, request.n
        if (
            request.model
            and (limit is None or (type(limit) is int and 0 < limit <= MOST_TOKENS))
            and (best_of is None or (type(best_of) is int and 0 < best_of <= MOST_TOKENS))
            and (n is None or (type(n) is int and 0 < n <= MOST_CHOICES))
        ):
            return request
        return decode_completion_request(request_to_wire(request))
    return decode_completion_request(request)


def _model_not_found(model: str) -> ModelNotFoundError:
    # Made where it is raised: an exception kept in a local of the raising frame would
    # hold that frame through its own traceback, a cycle for the garbage collector.
    return ModelNotFoundError(
        f"The model `{model}` does not exist or you do not have access to it.", param="model"
    )


async def _run_after_hooks(ctx: RequestContext, hooks: Sequence[RouterHooks]) -> None:
    for hook in reversed(hooks):
        try:
            await hook.after_request(ctx)
        except Exception:
            logger.exception("hook %r failed in after_request", hook)


def _overrides(hook: RouterHooks, event: str) -> bool:
    """Whether ``hook`` does something on ``event`` (a per-chunk call to a no-op costs)."""
    return getattr(type(hook), event, None) not in (None, getattr(RouterHooks, event))


def _record_failure(ctx: RequestContext, exc: BaseException) -> None:
    if isinstance(exc, (anyio.get_cancelled_exc_class(), GeneratorExit)):
        ctx.status = "cancelled"
    elif ctx.status != "ok":
        ctx.status = "error"
        if isinstance(exc, LLMRouterError):
            ctx.error = exc


def _choices(request: ChatRequest | CompletionRequest) -> int:
    """How many answers the upstream generates (and bills) for ``request``: ``n`` (or a
    completion's ``best_of``) for each of a completion's prompts."""
    if isinstance(request, ChatRequest):
        return request.n or 1
    return max(request.n or 1, request.best_of or 1) * request.prompt_count


def _counts_in_range(usage: Usage) -> Usage:
    """``usage`` with each count from 0 to :data:`~llmrouter.types.MOST_TOKENS`, as the
    ledger stores it: an upstream's negative count would lower the cost, a 30-digit one
    make it absurd, and the row would disagree with its cost. Usage in range (every real
    one) is returned as is."""
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    details = usage.prompt_tokens_details  # read directly: the cached_tokens property costs a call
    if (
        0 <= prompt <= MOST_TOKENS
        and 0 <= completion <= MOST_TOKENS
        and (details is None or 0 <= (details.cached_tokens or 0) <= prompt)
    ):
        return usage
    prompt, completion = min(max(prompt, 0), MOST_TOKENS), min(max(completion, 0), MOST_TOKENS)
    if details is not None:
        details = msgspec.structs.replace(
            details, cached_tokens=min(max(details.cached_tokens or 0, 0), prompt)
        )
    return msgspec.structs.replace(
        usage,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=details,
    )


def _within_limit(usage: Usage, request: ChatRequest | CompletionRequest | None) -> Usage:
    """Estimated usage with the answer counted at most at the output limit (times ``n``).

    tiktoken is rarely the upstream's tokenizer: its count of an answer cut at the limit
    may exceed the limit, which is all the budget reservation covered.
    """
    if request is None or request.output_limit is None:
        return usage
    most = request.output_limit * _choices(request)
    if usage.completion_tokens <= most:
        return usage
    return msgspec.structs.replace(usage, completion_tokens=most, total_tokens=usage.prompt_tokens + most)


async def _fill_usage(ctx: RequestContext, completion_text: str) -> None:
    """Set ``ctx.usage`` counted (in the work :func:`to_completion` runs: a cancellation
    it passes on afterwards must not lose the count)."""
    ctx.usage = await estimated_usage(ctx, completion_text)


def _wants_usage(request: ChatRequest | CompletionRequest) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


def _response_text(response: ChatResponse) -> str:
    parts = []
    for choice in response.choices:
        content = choice.message.content
        if isinstance(content, str):
            parts.append(content)
    return "".join(parts)


def _provider_chat(provider: Provider[Any], request: ChatRequest) -> Any:
    return provider.chat(request)


def _provider_stream(provider: Provider[Any], request: ChatRequest) -> AsyncIterator[ChatChunk]:
    return provider.stream(request)


def _provider_complete(provider: Provider[Any], request: CompletionRequest) -> Any:
    return provider.complete(request)


def _provider_stream_complete(
    provider: Provider[Any], request: CompletionRequest
) -> AsyncIterator[CompletionChunk]:
    return provider.stream_complete(request)
