"""TelemetryHooks on a real Router with scripted providers, read back through a user's
own MeterProvider (an InMemoryMetricReader): names, attributes, buckets and values."""

from __future__ import annotations

import gc
import time
import weakref

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from llmrouter import Router
from llmrouter.config import Config, Deployment, Price, Retry, RouterConfig
from llmrouter.context import RequestContext
from llmrouter.errors import BudgetExceededError, ModelNotFoundError, RateLimitError, UpstreamError
from llmrouter.hooks import RouterHooks
from llmrouter.telemetry import TelemetryHooks
from llmrouter.telemetry.metrics import DURATION_BUCKETS, TOKEN_BUCKETS
from llmrouter.testing.scripted import ScriptedProvider, Step
from llmrouter.types import Usage

pytestmark = pytest.mark.anyio

FAST_RETRY = Retry(attempts=2, backoff_base=0.001, backoff_max=0.005)


class Reader:
    """Collects once and answers questions about data points."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self._reader = reader
        self.metrics: dict[str, object] = {}

    def collect(self) -> Reader:
        data = self._reader.get_metrics_data()
        self.metrics = {
            metric.name: metric
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            if scope.scope.name == "llmrouter"
            for metric in scope.metrics
        }
        return self

    def points(self, name: str, **attributes: object) -> list:
        metric = self.metrics.get(name)
        assert metric is not None, f"{name} not recorded; have {sorted(self.metrics)}"
        wanted = {k.replace("__", "."): v for k, v in attributes.items()}
        return [
            p for p in metric.data.data_points if all(p.attributes.get(k) == v for k, v in wanted.items())
        ]

    def total(self, name: str, **attributes: object) -> float:
        points = self.points(name, **attributes)
        return sum(getattr(p, "sum", None) if hasattr(p, "bucket_counts") else p.value for p in points)

    def count(self, name: str, **attributes: object) -> int:
        return sum(p.count for p in self.points(name, **attributes))


@pytest.fixture
def reader() -> Reader:
    return Reader(InMemoryMetricReader())


@pytest.fixture
def hooks(reader: Reader) -> TelemetryHooks:
    provider = MeterProvider(metric_readers=[reader._reader])
    return TelemetryHooks(meter_provider=provider, log_requests=False)


def make_router(*providers: ScriptedProvider, hooks: list[RouterHooks], group: str = "g", **config_kwargs):
    router = Router(Config(router=RouterConfig(retry=FAST_RETRY), **config_kwargs), hooks=hooks)
    for i, provider in enumerate(providers):
        router.add_deployment(
            group, provider, Deployment(provider="scripted", model=provider.model, id=f"d{i}")
        )
    return router


def chat(model: str = "g", **extra):
    return {"model": model, "messages": [{"role": "user", "content": "one two three"}], **extra}


async def test_chat_records_semconv_token_usage_and_duration(hooks, reader):
    router = make_router(ScriptedProvider(default=Step(text="a b c d e")), hooks=[hooks])
    await router.chat(chat())
    reader.collect()
    base = {
        "gen_ai__operation__name": "chat",
        "gen_ai__provider__name": "scripted",
        "gen_ai__request__model": "g",
    }
    (inp,) = reader.points("gen_ai.client.token.usage", gen_ai__token__type="input", **base)
    (out,) = reader.points("gen_ai.client.token.usage", gen_ai__token__type="output", **base)
    assert (inp.sum, out.sum) == (3, 5)
    assert tuple(inp.explicit_bounds) == tuple(float(b) for b in TOKEN_BUCKETS)
    (duration,) = reader.points("gen_ai.client.operation.duration", **base)
    assert duration.count == 1 and "error.type" not in duration.attributes
    assert tuple(duration.explicit_bounds) == DURATION_BUCKETS
    assert reader.metrics["gen_ai.client.operation.duration"].unit == "s"
    # Not a stream: no time-to-first-chunk.
    assert "gen_ai.client.operation.time_to_first_chunk" not in reader.metrics


async def test_stream_records_time_to_first_chunk_and_per_chunk(hooks, reader):
    router = make_router(ScriptedProvider(default=Step(text="w1 w2 w3 w4 w5 w6")), hooks=[hooks])
    started = time.perf_counter()
    chunks = [c async for c in router.stream(chat(stream=True))]
    elapsed = time.perf_counter() - started
    assert len(chunks) > 2
    reader.collect()
    assert reader.count("gen_ai.client.operation.time_to_first_chunk", gen_ai__request__model="g") == 1
    # One observation per delivered chunk after the first: the gap since the previous one.
    base = {
        "gen_ai__operation__name": "chat",
        "gen_ai__provider__name": "scripted",
        "gen_ai__request__model": "g",
    }
    (per_chunk,) = reader.points("gen_ai.client.operation.time_per_output_chunk", **base)
    assert per_chunk.count == len(chunks) - 1
    assert 0 < per_chunk.sum <= elapsed
    assert reader.total("gen_ai.client.token.usage", gen_ai__token__type="output") == 6


async def test_upstream_error_sets_error_type_and_counts_retries(hooks, reader):
    failing = ScriptedProvider("m0", default=Step(error=UpstreamError("boom")))
    healthy = ScriptedProvider("m1", default=Step(text="ok"))
    router = make_router(failing, healthy, hooks=[hooks])
    await router.chat(chat())
    reader.collect()
    assert reader.total("llmrouter.retries", gen_ai__request__model="g") == 1
    assert (
        reader.total("llmrouter.deployment.attempts", llmrouter__deployment="d0", error__type="UpstreamError")
        == 1
    )
    assert (
        reader.total("llmrouter.deployment.attempts", llmrouter__deployment="d1", llmrouter__outcome="ok")
        == 1
    )

    broken = make_router(
        ScriptedProvider(default=Step(error=UpstreamError("down"))), hooks=[hooks], group="h"
    )
    with pytest.raises(UpstreamError):
        await broken.chat(chat("h"))
    reader.collect()
    (point,) = reader.points("gen_ai.client.operation.duration", gen_ai__request__model="h")
    assert point.attributes["error.type"] == "UpstreamError"


async def test_fallback_and_cooldown_counted(hooks, reader):
    from llmrouter.config import Cooldown, ModelGroup

    router = Router(Config(router=RouterConfig(retry=Retry(attempts=0))), hooks=[hooks])
    router.add_deployment("backup", ScriptedProvider("y", default=Step(text="fine")))
    router.add_deployment(
        "main",
        ScriptedProvider("x", default=Step(error=UpstreamError("down"))),
        Deployment(provider="scripted", model="x", id="main-d"),
    )
    router.groups["main"].config = ModelGroup(name="main", deployments=[], fallbacks=["backup"])
    router.groups["main"].cooldown = Cooldown(failures=1, seconds=30)
    await router.chat(chat("main"))
    reader.collect()
    assert (
        reader.total(
            "llmrouter.fallbacks", gen_ai__request__model="main", llmrouter__fallback__model="backup"
        )
        == 1
    )
    assert reader.total("llmrouter.deployment.cooldowns", llmrouter__deployment="main-d") == 1


class Refuse(RouterHooks):
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def before_request(self, ctx: RequestContext) -> None:
        raise self.error


@pytest.mark.parametrize("telemetry_first", [True, False])
@pytest.mark.parametrize(
    ("error", "reason"),
    [(RateLimitError("slow down"), "rate_limited"), (BudgetExceededError("no money"), "budget_exceeded")],
)
async def test_rejections_counted_once_whatever_the_hook_order(hooks, reader, error, reason, telemetry_first):
    refuse = Refuse(error)
    router = make_router(ScriptedProvider(), hooks=[hooks, refuse] if telemetry_first else [refuse, hooks])
    with pytest.raises(type(error)):
        await router.chat(chat())
    reader.collect()
    assert reader.total("llmrouter.requests.rejected", llmrouter__rejection__reason=reason) == 1
    # One duration observation per request, never two, whichever order the hooks run in.
    (point,) = reader.points("gen_ai.client.operation.duration")
    assert point.count == 1 and point.attributes["error.type"] == type(error).__name__
    assert hooks._spans == {} and hooks._attempt_started == {}


async def test_unknown_model_never_becomes_a_label(hooks, reader):
    router = make_router(ScriptedProvider(), hooks=[hooks])
    with pytest.raises(ModelNotFoundError):
        await router.chat(chat("attacker-chosen-name-123"))
    reader.collect()
    models = {
        p.attributes.get("gen_ai.request.model") for name in reader.metrics for p in reader.points(name)
    }
    assert "attacker-chosen-name-123" not in models
    assert reader.total("llmrouter.requests.rejected", llmrouter__rejection__reason="model_not_found") == 1


async def test_a_rejected_request_is_counted_once_and_not_kept_alive(hooks, reader):
    """A request refused before any attempt may get after_request and on_rejected: it
    counts once. The hooks remember it without holding it: a held context (its error, the
    error's traceback and frames) outlived the young collections, and under the service's
    tuned collector waited for a full one, ~9 kB a request of unknown model."""
    router = make_router(ScriptedProvider(), hooks=[hooks])
    ctx = RequestContext()
    with pytest.raises(ModelNotFoundError) as refused:
        await router.chat(chat("no-such-model"), context=ctx)
    hooks.on_rejected(ctx, refused.value)  # as a later hook's refusal would
    reader.collect()
    assert reader.count("gen_ai.client.operation.duration") == 1  # recorded once
    gone = weakref.ref(ctx)
    del ctx, refused
    gc.collect()
    assert gone() is None


async def test_cost_by_key_and_model_and_cache_status(hooks, reader):
    provider = ScriptedProvider(
        default=Step(text="x", usage=Usage(prompt_tokens=1000, completion_tokens=500, total_tokens=1500))
    )
    router = make_router(provider, hooks=[hooks])
    router.groups["g"].deployments[0].price = Price(input=2.0, output=4.0)
    await router.chat(chat(), context=RequestContext(api_key_id="key-1"))
    reader.collect()
    assert reader.total(
        "llmrouter.cost", llmrouter__api_key__id="key-1", gen_ai__request__model="g"
    ) == pytest.approx(0.004)
    assert reader.metrics["llmrouter.cost"].unit == "{USD}"

    # A cache hit: counted by status, no upstream tokens.
    ctx = RequestContext(
        model_group="g",
        provider="scripted",
        cache_status="hit",
        status="ok",
        usage=Usage(prompt_tokens=7, completion_tokens=7, total_tokens=14),
    )
    ctx.finished_at = ctx.started_at + 0.01
    await hooks.before_request(ctx)
    await hooks.after_request(ctx)
    reader.collect()
    assert reader.total("llmrouter.cache.requests", llmrouter__cache__status="hit") == 1
    assert reader.total("gen_ai.client.token.usage", gen_ai__token__type="input") == 1000


async def test_in_flight_per_deployment_gauge(hooks, reader):
    """The router's own counts, read at collection: busy while the provider works (before
    any answer exists), 0 when idle, every deployment present."""
    import anyio

    seen: dict[str, int] = {}
    observed, release = anyio.Event(), anyio.Event()

    class Blocking(ScriptedProvider):
        async def chat(self, request):
            reader.collect()
            seen.update(
                {
                    p.attributes["llmrouter.deployment"]: p.value
                    for p in reader.points("llmrouter.deployment.in_flight")
                }
            )
            observed.set()
            await release.wait()
            return await super().chat(request)

    router = make_router(Blocking("m0"), ScriptedProvider("m1"), hooks=[hooks])
    hooks.watch_router(router)
    hooks.watch_router(router)  # idempotent
    async with anyio.create_task_group() as tg:
        tg.start_soon(router.chat, chat())
        with anyio.fail_after(5):
            await observed.wait()
        release.set()
    assert seen == {"d0": 1, "d1": 0}
    reader.collect()
    idle = {
        p.attributes["llmrouter.deployment"]: p.value for p in reader.points("llmrouter.deployment.in_flight")
    }
    assert idle == {"d0": 0, "d1": 0}


def test_a_users_global_meter_provider_is_honoured(tmp_path):
    """Library use without the service: the user's own global SDK provider gets the metrics
    (in a subprocess: the global provider can be set once per process)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import anyio
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from llmrouter import Router
        from llmrouter.telemetry import TelemetryHooks
        from llmrouter.testing.scripted import ScriptedProvider, Step

        hooks = TelemetryHooks(log_requests=False)   # built before the user's SDK set-up
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

        async def main():
            router = Router(hooks=[hooks])
            router.add_deployment("g", ScriptedProvider(default=Step(text="a b")))
            await router.chat({"model": "g", "messages": [{"role": "user", "content": "hi"}]})

        anyio.run(main)
        names = sorted(m.name for rm in reader.get_metrics_data().resource_metrics
                       for sm in rm.scope_metrics for m in sm.metrics)
        print(",".join(names))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    names = result.stdout.strip().split(",")
    assert "gen_ai.client.token.usage" in names and "gen_ai.client.operation.duration" in names


async def test_a_reused_client_request_id_does_not_hide_requests(hooks, reader):
    # X-Request-ID comes from the client; the same one twice is two requests.
    router = make_router(ScriptedProvider(default=Step(text="a b")), hooks=[hooks])
    for _ in range(2):
        await router.chat(chat(), context=RequestContext(request_id="same-id"))
    with pytest.raises(ModelNotFoundError):
        await router.chat(chat("nope"), context=RequestContext(request_id="same-id"))
    reader.collect()
    assert reader.count("gen_ai.client.operation.duration") == 3


class EngineProvider(ScriptedProvider):
    """A provider with an in-process engine, reporting like the vLLM provider."""

    def engine_stats(self) -> dict:
        return {"state": "running", "requests_running": 3, "requests_waiting": 2, "kv_cache_usage": 0.25}


async def test_engine_queue_and_kv_cache_gauges(hooks, reader):
    router = make_router(EngineProvider(), ScriptedProvider(), hooks=[hooks])
    hooks.watch_router(router)
    reader.collect()
    (running,) = reader.points(
        "llmrouter.engine.requests", llmrouter__deployment="d0", llmrouter__engine__state="running"
    )
    (waiting,) = reader.points(
        "llmrouter.engine.requests", llmrouter__deployment="d0", llmrouter__engine__state="waiting"
    )
    (kv,) = reader.points("llmrouter.engine.kv_cache.usage", llmrouter__deployment="d0")
    assert (running.value, waiting.value, kv.value) == (3, 2, 0.25)
    assert reader.points("llmrouter.engine.requests", llmrouter__deployment="d1") == []
