"""The per-request fast paths of the telemetry hooks and the router's hook glue: each
gives what the general path it shortcuts gives."""

from __future__ import annotations

import logging
import math
import random

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from llmrouter import Router, ids
from llmrouter.config import Config, Deployment, Retry, RouterConfig
from llmrouter.context import RequestContext
from llmrouter.hooks import RouterHooks
from llmrouter.ids import random_hex
from llmrouter.telemetry import TelemetryHooks
from llmrouter.telemetry.logging import AccessRecord, current_access_record
from llmrouter.telemetry.tracing import RequestTracer, new_traceparent_header, parse_traceparent
from llmrouter.testing.scripted import ScriptedProvider, Step
from llmrouter.types import Usage

from .test_telemetry_labels import points

pytestmark = pytest.mark.anyio


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def hooks(reader: InMemoryMetricReader) -> TelemetryHooks:
    return TelemetryHooks(meter_provider=MeterProvider(metric_readers=[reader]), log_requests=False)


# --- the trace header -----------------------------------------------------------------------


def test_a_new_traceparent_is_random_hexs_draws_in_the_same_order() -> None:
    state = random.getstate()
    try:
        random.seed(7)
        expected = f"00-{random_hex(32)}-{random_hex(16)}-01"
        random.seed(7)
        assert new_traceparent_header() == expected
    finally:
        random.setstate(state)
    parsed = parse_traceparent(new_traceparent_header())
    assert parsed is not None and parsed.flags == "01"


def test_a_new_traceparent_never_has_a_zero_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "getrandbits", lambda bits: 0)
    header = new_traceparent_header()
    assert header == f"00-{'0' * 31}1-{'0' * 15}1-01"
    assert parse_traceparent(header) is not None


async def test_before_request_makes_keeps_or_replaces_the_header(hooks: TelemetryHooks) -> None:
    fresh = RequestContext()
    await hooks.before_request(fresh)
    assert parse_traceparent(fresh.traceparent) is not None

    valid = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    kept = RequestContext(traceparent=valid)
    await hooks.before_request(kept)
    assert kept.traceparent == valid

    replaced = RequestContext(traceparent="00-nonsense")
    await hooks.before_request(replaced)
    assert replaced.traceparent != "00-nonsense" and parse_traceparent(replaced.traceparent) is not None


async def test_before_request_takes_the_access_records_header(hooks: TelemetryHooks) -> None:
    made = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    record = AccessRecord("POST", "/v1/chat/completions", "rid", made)
    token = current_access_record.set(record)
    try:
        ctx = RequestContext()
        await hooks.before_request(ctx)
    finally:
        current_access_record.reset(token)
    assert ctx.traceparent == made and record.ctx is ctx


def test_the_global_provider_is_looked_up_at_most_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    tracer = RequestTracer()
    lookups: list[int] = []
    real = tracer._trace.get_tracer_provider

    def counted():  # type: ignore[no-untyped-def]
        lookups.append(1)
        return real()

    monkeypatch.setattr(tracer._trace, "get_tracer_provider", counted)
    assert not tracer.enabled_at(100.0)
    assert not tracer.enabled_at(100.5)
    assert len(lookups) == 1
    assert not tracer.enabled_at(101.0)
    assert len(lookups) == 2
    assert not tracer.enabled  # the property reads the clock itself: far past 101.0
    assert len(lookups) == 3


# --- settlement --------------------------------------------------------------------------------


def finished(**fields: object) -> RequestContext:
    defaults: dict[str, object] = {"model_group": "g", "provider": "scripted", "status": "ok", "attempts": 1}
    ctx = RequestContext(**{**defaults, **fields})  # type: ignore[arg-type]
    ctx.finished_at = ctx.started_at + 0.25
    return ctx


async def settle(hooks: TelemetryHooks, ctx: RequestContext) -> None:
    await hooks.before_request(ctx)
    await hooks.after_request(ctx)


async def test_cache_statuses_and_models_keep_their_own_series(
    hooks: TelemetryHooks, reader: InMemoryMetricReader
) -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    for status in ("miss", "hit", "miss", "coalesced", "bypass", None):
        await settle(hooks, finished(cache_status=status, usage=usage))
    await settle(hooks, finished(cache_status="miss", usage=usage, model_group="other"))
    counted = {
        (p.attributes["llmrouter.cache.status"], p.attributes["gen_ai.request.model"]): p.value
        for p in points(reader, "llmrouter.cache.requests")
    }
    assert counted == {
        ("miss", "g"): 2,
        ("hit", "g"): 1,
        ("coalesced", "g"): 1,
        ("bypass", "g"): 1,
        ("miss", "other"): 1,
    }
    # Tokens for the answers an upstream gave (miss, bypass, no cache): not a hit's or a coalesced one's.
    tokens = {
        (p.attributes["gen_ai.request.model"], p.attributes["gen_ai.token.type"]): (p.count, p.sum)
        for p in points(reader, "gen_ai.client.token.usage")
    }
    assert tokens == {
        ("g", "input"): (4, 12),
        ("g", "output"): (4, 16),
        ("other", "input"): (1, 3),
        ("other", "output"): (1, 4),
    }
    durations = points(reader, "gen_ai.client.operation.duration")
    assert sum(p.count for p in durations) == 7
    assert all("error.type" not in p.attributes for p in durations)


async def test_a_subclass_labelling_models_its_own_way_labels_every_request(
    reader: InMemoryMetricReader,
) -> None:
    class Families(TelemetryHooks):
        def model_label(self, ctx: RequestContext, error: BaseException | None = None) -> str:
            return "family:" + super().model_label(ctx, error)

    hooks = Families(meter_provider=MeterProvider(metric_readers=[reader]), log_requests=False)
    for _ in range(3):  # the name is labelled after the first
        await settle(hooks, finished())
    labels = {
        p.attributes["gen_ai.request.model"] for p in points(reader, "gen_ai.client.operation.duration")
    }
    assert labels == {"family:g"}


@pytest.mark.parametrize("elapsed", [-1.0, math.nan, 0.0])
async def test_a_duration_below_zero_or_nan_is_recorded_as_zero(
    hooks: TelemetryHooks, reader: InMemoryMetricReader, elapsed: float
) -> None:
    ctx = finished()
    ctx.finished_at = ctx.started_at + elapsed
    await settle(hooks, ctx)
    (point,) = points(reader, "gen_ai.client.operation.duration")
    assert (point.count, point.sum, point.min) == (1, 0.0, 0.0)


async def test_failures_still_get_their_error_type(
    hooks: TelemetryHooks, reader: InMemoryMetricReader
) -> None:
    await settle(hooks, finished())
    await settle(hooks, finished(status="cancelled"))
    errored = finished(status="error", attempts=1)
    await settle(hooks, errored)
    types = sorted(
        p.attributes.get("error.type", "") for p in points(reader, "gen_ai.client.operation.duration")
    )
    assert types == ["", "_OTHER", "cancelled"]


async def test_a_request_refused_before_any_attempt_is_recorded_once(
    hooks: TelemetryHooks, reader: InMemoryMetricReader
) -> None:
    from llmrouter.errors import RateLimitError

    ctx = finished(status="error", attempts=0)
    await settle(hooks, ctx)
    hooks.on_rejected(ctx, RateLimitError("slow down"))
    await hooks.after_request(ctx)
    assert sum(p.count for p in points(reader, "gen_ai.client.operation.duration")) == 1
    # An ordinary request settles however many were remembered.
    await settle(hooks, finished())
    assert sum(p.count for p in points(reader, "gen_ai.client.operation.duration")) == 2


async def test_the_library_line_is_written_with_log_requests(caplog: pytest.LogCaptureFixture) -> None:
    hooks = TelemetryHooks(meter_provider=MeterProvider(), log_requests=True)
    with caplog.at_level(logging.INFO, logger="llmrouter.access"):
        await settle(hooks, finished())
    assert [record.name for record in caplog.records] == ["llmrouter.access"]
    quiet = TelemetryHooks(meter_provider=MeterProvider(), log_requests=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llmrouter.access"):
        await settle(quiet, finished())
    assert caplog.records == []


# --- the router's glue ---------------------------------------------------------------------------


class Events(RouterHooks):
    settles_inline = True

    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    async def before_request(self, ctx: RequestContext) -> None:
        self.seen.append(f"{self.name}.before")

    async def after_request(self, ctx: RequestContext) -> None:
        self.seen.append(f"{self.name}.after")

    def on_attempt(self, ctx, deployment, error):  # type: ignore[no-untyped-def]
        self.seen.append(f"{self.name}.attempt:{deployment}:{error is None}")

    def on_first_token(self, ctx: RequestContext) -> None:
        self.seen.append(f"{self.name}.first_token")


class Failing(RouterHooks):
    settles_inline = True

    async def after_request(self, ctx: RequestContext) -> None:
        raise RuntimeError("exporter down")

    def on_attempt(self, ctx, deployment, error):  # type: ignore[no-untyped-def]
        raise RuntimeError("exporter down")

    def on_first_token(self, ctx: RequestContext) -> None:
        raise RuntimeError("exporter down")


@pytest.mark.parametrize("stream", [False, True])
async def test_hooks_hear_every_event_in_order_and_failures_are_only_logged(
    stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    hooks = [Events("a", seen), Failing(), RouterHooks(), Events("b", seen)]
    router = Router(Config(router=RouterConfig(retry=Retry(attempts=0))), hooks=hooks)
    router.add_deployment(
        "g", ScriptedProvider(default=Step(text="hi")), Deployment(provider="scripted", model="m", id="d0")
    )
    body = {"model": "g", "messages": [{"role": "user", "content": "x"}]}
    with caplog.at_level(logging.ERROR):
        if stream:
            async for _ in router.stream(body):
                pass
        else:
            await router.chat(body)
    first_token = ["a.first_token", "b.first_token"]
    attempt = ["a.attempt:d0:True", "b.attempt:d0:True"]
    # A stream's first chunk comes before its attempt ends; an answer's attempt ends first.
    events = first_token + attempt if stream else attempt + first_token
    assert seen == ["a.before", "b.before", *events, "b.after", "a.after"]
    failed_in = sorted(record.getMessage().rsplit(" ", 1)[-1] for record in caplog.records)
    assert failed_in == ["after_request", "on_attempt", "on_first_token"]


async def test_a_router_without_hooks_settles() -> None:
    router = Router(Config())
    router.add_deployment(
        "g", ScriptedProvider(default=Step(text="hi")), Deployment(provider="scripted", model="m", id="d0")
    )
    ctx = RequestContext()
    await router.chat({"model": "g", "messages": [{"role": "user", "content": "x"}]}, context=ctx)
    assert ctx.status == "ok" and ctx.finished_at is not None and ctx.cost == 0.0
