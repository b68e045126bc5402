"""Router hooks that record metrics, spans and the request log line from the context.

Install them on a :class:`~llmrouter.router.Router` (``hooks=[TelemetryHooks()]``);
the service does so through :class:`~llmrouter.telemetry.extension.TelemetryExtension`.
Everything is read from :class:`~llmrouter.context.RequestContext`: the router fills
it, these hooks only observe (they never raise into the request path).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict
from functools import lru_cache
from operator import sub
from typing import TYPE_CHECKING, Any, NamedTuple

from llmrouter.dispatch import AttemptCancelledError
from llmrouter.errors import (
    AuthenticationError,
    BudgetExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    RateLimitError,
)
from llmrouter.hooks import RouterHooks
from llmrouter.registry import available_providers, load_provider_class
from llmrouter.telemetry.local import Recorder, keep_bound
from llmrouter.telemetry.logging import (
    ACCESS_LOGGER,
    LIBRARY_LINE,
    context_fields,
    current_access_record,
    log_request,
)
from llmrouter.telemetry.metrics import RouterMetrics
from llmrouter.telemetry.tracing import (
    RequestTracer,
    new_traceparent_header,
    parse_traceparent,
    perf_to_ns,
    span_traceparent,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span

    from llmrouter.context import CacheStatus, RequestContext
    from llmrouter.errors import LLMRouterError

__all__ = ["UNVERIFIED", "TelemetryHooks", "error_type", "rejection_reason", "unverified_label"]

_log = logging.getLogger(__name__)

_OPERATION_NAMES = {"chat": "chat", "completion": "text_completion"}
_NO_UPSTREAM_TOKENS = frozenset({"hit", "coalesced"})
_INPUT = (("gen_ai.token.type", "input"),)
_OUTPUT = (("gen_ai.token.type", "output"),)
UNKNOWN = "unknown"
UNVERIFIED = "unverified"
"""What stands for the model of a direct ``provider/model`` name (and its deployment)
that has not served a request yet: see :meth:`TelemetryHooks.model_label`."""
_RECORDED_MEMORY = 1024


def error_type(ctx: RequestContext) -> str | None:
    """``error.type`` for a finished request: the error's class name, ``cancelled``, or None."""
    if ctx.status == "cancelled":
        return "cancelled"
    if ctx.status == "error" or ctx.error is not None:
        return type(ctx.error).__name__ if ctx.error is not None else "_OTHER"
    return None


def rejection_reason(error: BaseException) -> str:
    """A small, fixed vocabulary for ``llmrouter.rejection.reason``."""
    if isinstance(error, BudgetExceededError):
        return "budget_exceeded"
    if isinstance(error, RateLimitError):
        return "rate_limited"
    if isinstance(error, (AuthenticationError, PermissionDeniedError)):
        return "unauthorized"
    if isinstance(error, ModelNotFoundError):
        return "model_not_found"
    if isinstance(error, InvalidRequestError):
        return "invalid_request"
    return "other"


def unverified_label(name: str) -> str:
    """``<provider>/unverified``: the label of a direct name or deployment id that has not
    served yet (both begin with their provider's name)."""
    return f"{name.partition('/')[0]}/{UNVERIFIED}"


class TelemetryHooks(RouterHooks):
    """Records llmrouter's metrics (and spans, and the request log line) per request.

    Args:
        meter_provider: where instruments live; None uses the global MeterProvider.
        metrics: share instruments with another component (overrides ``meter_provider``).
        tracer_provider: where spans go; None uses the global TracerProvider (no-op
            unless the application installed an SDK one).
        log_requests: write the request log line when no HTTP middleware will (library use).
    """

    settles_inline = True  # after_request records, ends the span and logs: it never waits
    counts_unauthenticated = True
    """The service also calls :meth:`on_rejected` for completion requests its own
    authentication refused (``unauthorized``), which never reach the router; only hooks
    that say so are told (see ``Service._refused``)."""

    def __init__(
        self,
        *,
        meter_provider: MeterProvider | None = None,
        metrics: RouterMetrics | None = None,
        tracer_provider: Any = None,
        log_requests: bool = True,
    ) -> None:
        self.metrics = metrics or RouterMetrics(meter_provider)
        self.tracer = RequestTracer(tracer_provider)
        self.log_requests = log_requests
        self._access_log = logging.getLogger(ACCESS_LOGGER)
        self._spans: dict[int, Span] = {}
        self._routers: list[weakref.ref[Any]] = []
        self._attempt_started: dict[int, int] = {}
        # State is keyed by id(ctx), not request_id: clients choose X-Request-ID and may
        # reuse it. A hook rejecting a request gets after_request on the hooks admitted
        # before it *and* on_rejected on all: _recorded makes each request count once.
        self._recorded: OrderedDict[int, weakref.ref[RequestContext]] = OrderedDict()
        # Bound instruments (see llmrouter.telemetry.local), made once per label set.
        # By operation, provider, model and cache status: one lookup a request.
        self._bound: dict[tuple[str, str | None, str, CacheStatus | None], _Bound] = {}
        self._ok_attempts: dict[str, Recorder] = {}  # by deployment
        # Label values of model group names and deployment ids, as model_label() and
        # deployment_label() found them: configured ones, and direct ones that served.
        self._model_labels: dict[str, str] = {}
        self._deployment_labels: dict[str, str] = {}
        self.metrics.add_in_flight_source(self.in_flight)
        self.metrics.add_engine_source(self.engine_stats)

    # --- admission ----------------------------------------------------------------

    async def before_request(self, ctx: RequestContext) -> None:
        if ctx.stream and ctx.chunk_times is None:
            # The router notes when each chunk goes out; the gaps are recorded as
            # time_per_output_chunk when the request settles, in one call.
            ctx.chunk_times = []  # a list: array("d").append parses its argument by format string
        _adopt_trace(ctx)
        # The request's start stands for now: the global provider is looked up at most
        # once a second all the same, without a clock read per request.
        if not self.tracer.enabled_at(ctx.started_at):
            return
        model = self.model_label(ctx)
        try:
            span = self.tracer.start_request_span(
                f"{_OPERATION_NAMES.get(ctx.operation, ctx.operation)} {model}",
                ctx.traceparent,
                dict(_base_attributes(ctx, model)),
            )
        except Exception:  # noqa: BLE001 - tracing must never reject a request
            _log.exception("telemetry: could not start the request span")
            return
        own = span_traceparent(span)
        if own is not None:
            self._spans[id(ctx)] = span
            # Upstreams see the router's span as their parent.
            ctx.traceparent = own
        self._attempt_started[id(ctx)] = time.time_ns()

    def on_rejected(self, ctx: RequestContext, error: LLMRouterError) -> None:
        self.metrics.rejected.add(
            1,
            (
                ("llmrouter.rejection.reason", rejection_reason(error)),
                ("gen_ai.request.model", self.model_label(ctx, error)),
            ),
        )
        self._forget(ctx)
        if not self._first_record(ctx):
            return
        if ctx.error is None:
            ctx.error = error
        if id(ctx) not in self._spans:
            # Refused before this hook's before_request (an unknown model, another hook's
            # auth or limits): its log line still names the request's trace.
            _adopt_trace(ctx)
        try:
            self._record(ctx)
        finally:
            self._end_span(ctx)
            self._log(ctx, outcome="rejected")

    # --- events on the hot path --------------------------------------------------

    def on_attempt(self, ctx: RequestContext, deployment: str, error: LLMRouterError | None) -> None:
        label = deployment
        if error is None:
            ok = self._ok_attempts.get(deployment) or self._bind_ok_attempts(deployment)
            ok(1)
        else:
            label = self.deployment_label(deployment)
            self.metrics.attempts.add(1, _attempt_attributes(label, error))
        span = self._spans.get(id(ctx)) if self._spans else None
        if span is None:
            # No span, no call spans to time. Also: a coalesced flight goes on calling
            # upstream for a launching request that already left and was settled; a
            # start time stored for it now would never be removed.
            return
        now = time.time_ns()
        started = self._attempt_started.get(id(ctx))
        self._attempt_started[id(ctx)] = now
        if started is not None:
            operation = _OPERATION_NAMES.get(ctx.operation, ctx.operation)
            call_attributes = {
                **dict(_attempt_attributes(label, error)),
                "gen_ai.operation.name": operation,
            }
            # The router fills ctx.provider/upstream_model only after an attempt succeeded:
            # ask the watched routers what this deployment is.
            described = self._describe(deployment)
            if described is not None:
                call_attributes["gen_ai.provider.name"], call_attributes["gen_ai.request.model"] = described
            name = f"{operation} {label}"
            self.tracer.record_call_span(span, name, call_attributes, start_ns=started, error=error)

    def _bind_ok_attempts(self, deployment: str) -> Recorder:
        """The successful attempts' counter of ``deployment``, bound; it has served, so
        its id is its label from now on (see :meth:`deployment_label`)."""
        self._deployment_labels[deployment] = deployment
        bound = self.metrics.attempts.bind(_attempt_attributes(deployment, None))
        return keep_bound(self._ok_attempts, deployment, bound)

    def on_fallback(self, ctx: RequestContext, from_group: str, to_group: str) -> None:
        self.metrics.fallbacks.add(
            1, (("gen_ai.request.model", from_group), ("llmrouter.fallback.model", to_group))
        )

    def on_cooldown(self, deployment: str, seconds: float) -> None:
        self.metrics.cooldowns.add(1, (("llmrouter.deployment", self.deployment_label(deployment)),))

    # --- settlement -----------------------------------------------------------------

    async def after_request(self, ctx: RequestContext) -> None:
        self._forget(ctx)
        if not self._first_record(ctx):
            return
        try:
            self._record(ctx, ctx.chunk_times)
        finally:
            self._end_span(ctx)
            self._log(ctx)

    def _record(self, ctx: RequestContext, chunk_times: list[float] | None = None) -> None:
        metrics = self.metrics
        model = self.model_label(ctx)
        label_set = (ctx.operation, ctx.provider, model, ctx.cache_status)
        bound = self._bound.get(label_set) or self._bind(label_set)
        if chunk_times is not None and len(chunk_times) > 1:
            # One observation per chunk after the first: the time since the previous one.
            metrics.record_chunk_times(map(sub, chunk_times[1:], chunk_times), bound.attributes)
        finished = ctx.finished_at if ctx.finished_at is not None else time.perf_counter()
        duration = finished - ctx.started_at
        # max(0.0, duration) without the call (~1.2k instructions); NaN is 0 alike.
        duration = duration if duration > 0.0 else 0.0
        failure = error_type(ctx)
        if failure is None:
            bound.duration(duration)
        else:
            metrics.operation_duration.record(duration, (*bound.attributes, ("error.type", failure)))
        usage = ctx.usage
        if usage is not None and bound.counts_tokens:
            bound.input_tokens(usage.prompt_tokens)
            bound.output_tokens(usage.completion_tokens)
        if ctx.stream and ctx.first_token_at is not None:
            bound.time_to_first_chunk(ctx.first_token_at - ctx.started_at)
        if ctx.cost:
            metrics.cost.add(
                ctx.cost,
                (("llmrouter.api_key.id", ctx.api_key_id or "none"), ("gen_ai.request.model", model)),
            )
        if bound.cache_requests is not None:
            bound.cache_requests(1)
        if ctx.attempts > 1:
            metrics.retries.add(ctx.attempts - 1, (("gen_ai.request.model", model),))

    def _bind(self, label_set: tuple[str, str | None, str, CacheStatus | None]) -> _Bound:
        """The bound instruments of a request's operation, provider, model and cache status."""
        operation, provider, model, status = label_set
        keys = _series_keys(operation, provider, model)
        metrics = self.metrics
        bound = _Bound(
            keys.base,
            metrics.operation_duration.bind(keys.base),
            metrics.token_usage.bind(keys.input_tokens),
            metrics.token_usage.bind(keys.output_tokens),
            metrics.time_to_first_chunk.bind(keys.base),
            # An answer from the cache or another request's call used no upstream tokens.
            status not in _NO_UPSTREAM_TOKENS,
            None if status is None else metrics.cache_requests.bind(_cache_series_key(status, model)),
        )
        return keep_bound(self._bound, label_set, bound)

    def _log(self, ctx: RequestContext, outcome: str | None = None) -> None:
        record = current_access_record.get()
        if record is not None:
            # The HTTP middleware writes the line once the status is known.
            record.ctx = ctx
            return
        if self.log_requests and self._access_log.isEnabledFor(logging.INFO):
            fields = context_fields(ctx)
            if outcome is not None:
                fields["outcome"] = outcome
            log_request(self._access_log, logging.INFO, LIBRARY_LINE, fields)

    def _end_span(self, ctx: RequestContext) -> None:
        span = self._spans.pop(id(ctx), None) if self._spans else None
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        if ctx.usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", ctx.usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", ctx.usage.completion_tokens)
        for key, value in (
            # Known once a deployment answered (the span started before any did).
            ("gen_ai.provider.name", ctx.provider),
            ("gen_ai.response.model", ctx.upstream_model),
            ("llmrouter.deployment", ctx.deployment),
            ("llmrouter.cache.status", ctx.cache_status),
            ("llmrouter.cost", ctx.cost),
        ):
            if value is not None:
                span.set_attribute(key, value)
        failure = error_type(ctx)
        if failure is not None:
            span.set_attribute("error.type", failure)
            span.set_status(Status(StatusCode.ERROR, str(ctx.error or failure)[:200]))
        end = perf_to_ns(ctx.finished_at) if ctx.finished_at is not None else None
        span.end(end_time=end)

    # --- label values -------------------------------------------------------------

    def model_label(self, ctx: RequestContext, error: BaseException | None = None) -> str:
        """``gen_ai.request.model`` of a request: its model group, ``unknown`` for a name
        the router does not know, ``<provider>/unverified`` for a direct name that has
        not served yet (see :meth:`_name_label`)."""
        name = ctx.model_group
        if name is None or isinstance(error or ctx.error, ModelNotFoundError):
            return UNKNOWN
        return self._model_labels.get(name) or self._name_label(name, served=ctx.status == "ok")

    def _name_label(self, name: str, *, served: bool) -> str:
        """The label of a model group name not labelled yet (its first request, or a
        direct name that has not served).

        A direct ``provider/model`` name is whatever a client typed: it becomes a label
        only once it has answered a request, when the upstream has the model (and the
        router keeps a direct group that served, so there are at most
        ``router.max_direct_models`` of them). A configured name is one at once."""
        if served or not self._is_direct(name):
            self._model_labels[name] = name
            return name
        return unverified_label(name)

    def deployment_label(self, deployment: str) -> str:
        """``llmrouter.deployment`` of a deployment id: the id, unless it is a direct
        group's deployment that has not served yet (``<provider>/unverified``)."""
        label = self._deployment_labels.get(deployment)
        if label is not None:
            return label
        if self._in_direct_group(deployment):
            return unverified_label(deployment)
        self._deployment_labels[deployment] = deployment
        return deployment

    def _is_direct(self, name: str) -> bool:
        """Whether the model group ``name`` is a direct ``provider/model`` group, as a
        watched router knows it; else (an unwatched router, a direct group evicted since)
        whether it has the shape of one."""
        for router in self._watched():
            group = router.groups.get(name)
            if group is not None:
                return _direct_groups(router).get(name) is group
        return _shaped_direct(name)

    def _in_direct_group(self, deployment: str) -> bool:
        """Whether ``deployment`` serves a direct group (see :meth:`_is_direct`)."""
        for router in self._watched():
            direct = _direct_groups(router)
            for group in router.groups.values():
                if any(d.id == deployment for d in group.deployments):
                    return direct.get(group.name) is group
        return _shaped_direct(deployment)

    # --- state ----------------------------------------------------------------------

    def _watched(self) -> list[Any]:
        """The watched routers still alive."""
        return [router for ref in self._routers if (router := ref()) is not None]

    def watch_router(self, router: Any) -> None:
        """Report ``router``'s requests in flight per deployment (``llmrouter.deployment.in_flight``).

        The router's own counts are the truth (a deployment is busy from dispatch to the
        end of the answer, retries included) and every deployment reports, idle ones at 0.
        The router also tells which of its groups are direct ``provider/model`` names
        (see :meth:`model_label`); unwatched, the hooks go by a name's shape.
        The service calls this itself; a library user calls it once per router.
        """
        if not any(ref() is router for ref in self._routers):
            self._routers.append(weakref.ref(router))

    def _describe(self, deployment_id: str) -> tuple[str, str] | None:
        for router in self._watched():
            for deployment in router.deployments:
                if deployment.id == deployment_id:
                    return deployment.config.provider, deployment.config.model
        return None

    def in_flight(self) -> dict[str, int]:
        """Requests in flight by deployment label (see :meth:`deployment_label`), over
        the watched routers."""
        counts: dict[str, int] = {}
        for router in self._watched():
            direct = _direct_groups(router)
            for group in router.groups.values():
                is_direct = direct.get(group.name) is group
                for deployment in group.deployments:
                    label = deployment.id
                    if is_direct:
                        label = self._deployment_labels.get(label) or unverified_label(label)
                    counts[label] = counts.get(label, 0) + deployment.in_flight
        return counts

    def engine_stats(self) -> dict[str, dict[str, Any]]:
        """``engine_stats()`` of every watched deployment whose provider has one (vLLM)."""
        stats: dict[str, dict[str, Any]] = {}
        for router in self._watched():
            for deployment in router.deployments:
                read = getattr(deployment.provider, "engine_stats", None)
                if read is None:
                    continue
                try:
                    stats[deployment.id] = read()
                except Exception:  # noqa: BLE001 - a scrape must not fail on one engine
                    _log.exception("telemetry: engine_stats of %s failed", deployment.id)
        return stats

    def _forget(self, ctx: RequestContext) -> None:
        if self._attempt_started:
            self._attempt_started.pop(id(ctx), None)

    def _first_record(self, ctx: RequestContext) -> bool:
        """True the first time a request is settled (after_request or on_rejected)."""
        key = id(ctx)
        remembered = self._recorded.get(key)
        if remembered is not None and remembered() is ctx:
            return False
        # Only a request that failed before any attempt can still see on_rejected. A weak
        # reference tells a reused id from the same context without keeping it alive: held
        # here, each context (its error, that error's traceback and frames) outlived the
        # young collections and waited for a full one, ~9 kB a request of unknown model.
        if ctx.status == "error" and ctx.attempts == 0:
            self._recorded[key] = weakref.ref(ctx)
            while len(self._recorded) > _RECORDED_MEMORY:
                self._recorded.popitem(last=False)
        return True


def _direct_groups(router: Any) -> dict[str, Any]:
    """A router's direct ``provider/model`` groups by name (the router keeps them apart:
    they are the names clients made up)."""
    direct: dict[str, Any] = getattr(router, "_direct", None) or {}
    return direct


def _shaped_direct(name: str) -> bool:
    """Whether ``name`` has the shape of a direct name or deployment id: ``<provider>/...``
    of an installed provider that allows them (as ``Router._direct_group`` requires)."""
    provider, slash, model = name.partition("/")
    if not (slash and model) or provider not in available_providers():
        return False
    try:
        return load_provider_class(provider).direct
    except Exception:  # noqa: BLE001 - a provider that cannot load serves no direct names
        return False


def _adopt_trace(ctx: RequestContext) -> None:
    """Give the request its access line's record (when the HTTP middleware keeps one) and
    a valid ``traceparent``: the one the middleware made or checked, the caller's own
    when valid, else a new trace's."""
    record = current_access_record.get()
    if record is not None:
        record.ctx = ctx
        if ctx.traceparent is None:
            ctx.traceparent = record.traceparent
    checked = record is not None and ctx.traceparent == record.traceparent
    if not checked and parse_traceparent(ctx.traceparent) is None:
        ctx.traceparent = new_traceparent_header()


def _base_attributes(ctx: RequestContext, model: str) -> tuple[tuple[str, Any], ...]:
    """A request's operation, provider and model as (name, value) pairs: the series key
    of its metrics, and the request span's attributes."""
    return _series_keys(ctx.operation, ctx.provider, model).base


def _attempt_attributes(deployment: str, error: LLMRouterError | None) -> tuple[tuple[str, Any], ...]:
    if error is None:
        return (("llmrouter.deployment", deployment), ("llmrouter.outcome", "ok"))
    if isinstance(error, AttemptCancelledError):  # the caller left: no failure of the deployment
        return (
            ("llmrouter.deployment", deployment),
            ("llmrouter.outcome", "cancelled"),
            ("error.type", "cancelled"),
        )
    return (
        ("llmrouter.deployment", deployment),
        ("llmrouter.outcome", "error"),
        ("error.type", type(error).__name__),
    )


class _Bound(NamedTuple):
    """A label set's bound instruments: what a request that did not fail records, each
    a C call."""

    attributes: tuple[tuple[str, Any], ...]
    duration: Recorder
    input_tokens: Recorder
    output_tokens: Recorder
    time_to_first_chunk: Recorder
    counts_tokens: bool
    """Whether the request's usage is recorded (not for a cache hit or a coalesced answer)."""
    cache_requests: Recorder | None
    """``llmrouter.cache.requests`` of the request's cache status (None: no cache)."""


class _SeriesKeys(NamedTuple):
    """The attribute tuples a request's metrics are recorded under."""

    base: tuple[tuple[str, Any], ...]
    input_tokens: tuple[tuple[str, Any], ...]
    output_tokens: tuple[tuple[str, Any], ...]


# Made once per operation, provider and model (all bounded by configuration), not per
# request: building and concatenating them cost ~3k CPU instructions a request.
@lru_cache(maxsize=1024)
def _series_keys(operation: str, provider: str | None, model: str) -> _SeriesKeys:
    base = (
        ("gen_ai.operation.name", _OPERATION_NAMES.get(operation, operation)),
        ("gen_ai.provider.name", provider or UNKNOWN),
        ("gen_ai.request.model", model),
    )
    return _SeriesKeys(base, base + _INPUT, base + _OUTPUT)


def _cache_series_key(status: str, model: str) -> tuple[tuple[str, Any], ...]:
    return (("llmrouter.cache.status", status), ("gen_ai.request.model", model))
