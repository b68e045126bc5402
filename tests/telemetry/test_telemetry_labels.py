"""A client cannot mint label values: a direct ``provider/model`` name (and its
deployment's id) is a label only once it has served a request; before that it is
recorded as ``<provider>/unverified``.

Before: every made-up ``ollama/<anything>`` became new series in six instruments (3,000
names made a 16 MB scrape that took 2 s on the event loop)."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from llmrouter import Router
from llmrouter.config import Config, Cooldown, Deployment, ModelGroup, Retry, RouterConfig
from llmrouter.context import RequestContext
from llmrouter.errors import LLMRouterError, UpstreamConnectionError
from llmrouter.registry import register_provider
from llmrouter.telemetry import TelemetryHooks
from llmrouter.testing.scripted import ScriptedProvider, Step

pytestmark = pytest.mark.anyio

PROVIDER = "labels-daemon"
UNVERIFIED = f"{PROVIDER}/unverified"


class Daemon(ScriptedProvider):
    """A direct provider, like Ollama: it serves the models it holds (``real*``); any
    other name fails (a daemon's 404, or a daemon that is down)."""

    direct = True

    def __init__(self, model: str = "scripted-model", options: Any = None) -> None:
        failing = Step(error=UpstreamConnectionError("no such model"))
        super().__init__(model, options, default=Step(text="hi") if model.startswith("real") else failing)


register_provider(PROVIDER, Daemon)


def made_up(i: int) -> str:
    return f"{PROVIDER}/made-up-{i}"


def all_label_values(reader: InMemoryMetricReader) -> set[str]:
    data = reader.get_metrics_data()
    return {
        str(value)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
        for value in point.attributes.values()
    }


def points(reader: InMemoryMetricReader, name: str, **attributes: str) -> list[Any]:
    data = reader.get_metrics_data()
    wanted = {key.replace("__", "."): value for key, value in attributes.items()}
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
        if all(point.attributes.get(k) == v for k, v in wanted.items())
    ]


def setup(*, watched: bool, groups: list[ModelGroup] | None = None) -> tuple[Router, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    hooks = TelemetryHooks(meter_provider=MeterProvider(metric_readers=[reader]), log_requests=False)
    config = Config(
        models=groups or [],
        # A retry, then a cooldown: every instrument that names a model or a deployment
        # records something for each made-up name.
        router=RouterConfig(
            retry=Retry(attempts=1, backoff_base=0.0001, backoff_max=0.0001),
            cooldown=Cooldown(failures=2, seconds=30),
        ),
    )
    router = Router(config, hooks=[hooks])
    if watched:
        hooks.watch_router(router)
    return router, reader


async def ask(router: Router, model: str, **extra: Any) -> bool:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    try:
        if extra.get("stream"):
            [chunk async for chunk in router.stream(body)]
        else:
            await router.chat(body)
    except LLMRouterError:
        return False
    return True


@pytest.mark.parametrize("watched", [True, False])
async def test_made_up_direct_names_never_become_label_values(watched: bool) -> None:
    router, reader = setup(watched=watched)
    for i in range(20):
        assert not await ask(router, made_up(i), stream=i % 2 == 1)
    values = all_label_values(reader)
    assert not [value for value in values if "made-up" in value]
    assert UNVERIFIED in values
    failed = points(reader, "gen_ai.client.operation.duration", gen_ai__request__model=UNVERIFIED)
    assert sum(point.count for point in failed) == 20
    attempts = points(reader, "llmrouter.deployment.attempts", llmrouter__deployment=UNVERIFIED)
    assert sum(point.value for point in attempts) == 40
    retries = points(reader, "llmrouter.retries", gen_ai__request__model=UNVERIFIED)
    assert sum(point.value for point in retries) == 20
    cooled = points(reader, "llmrouter.deployment.cooldowns", llmrouter__deployment=UNVERIFIED)
    assert sum(point.value for point in cooled) == 20
    if watched:
        (in_flight,) = points(reader, "llmrouter.deployment.in_flight")
        assert in_flight.attributes["llmrouter.deployment"] == UNVERIFIED


@pytest.mark.parametrize("watched", [True, False])
async def test_a_direct_name_is_a_label_once_it_has_served(watched: bool) -> None:
    router, reader = setup(watched=watched)
    real = f"{PROVIDER}/real-model"
    assert await ask(router, real)
    # It exists upstream now: its failures and its deployment are named too.
    (deployment,) = router.groups[real].deployments
    busy = Step(error=UpstreamConnectionError("busy"))
    deployment.provider.steps.extend([busy, busy])  # type: ignore[attr-defined]
    assert not await ask(router, real)
    durations = points(reader, "gen_ai.client.operation.duration", gen_ai__request__model=real)
    assert sorted(point.attributes.get("error.type", "") for point in durations) == [
        "",
        "UpstreamConnectionError",
    ]
    attempts = points(reader, "llmrouter.deployment.attempts", llmrouter__deployment=real)
    assert {point.attributes["llmrouter.outcome"] for point in attempts} == {"ok", "error"}
    assert UNVERIFIED not in all_label_values(reader)


async def test_a_configured_group_is_named_even_before_it_serves() -> None:
    # Shaped like a direct name, but configured: the operator's name, at once.
    name = f"{PROVIDER}/configured"
    group = ModelGroup(name=name, deployments=[Deployment(provider=PROVIDER, model="broken", id="mine")])
    router, reader = setup(watched=True, groups=[group])
    assert not await ask(router, name)
    assert points(reader, "gen_ai.client.operation.duration", gen_ai__request__model=name)
    assert points(reader, "llmrouter.deployment.attempts", llmrouter__deployment="mine")
    assert UNVERIFIED not in all_label_values(reader)


async def test_a_direct_name_no_router_holds_any_more_is_not_a_label() -> None:
    # Evicted between its release and its settlement (another client's new name took
    # the slot): a watched router no longer knows it, and it has not served.
    router, _ = setup(watched=True)
    (hooks,) = router.hooks
    assert isinstance(hooks, TelemetryHooks)
    ctx = RequestContext(model_group=f"{PROVIDER}/gone", status="error")
    assert hooks.model_label(ctx) == UNVERIFIED
    assert hooks.deployment_label(f"{PROVIDER}/gone#2") == UNVERIFIED
