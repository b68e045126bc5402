"""Every upstream call ends with exactly one ``on_attempt``, a cancelled one too.

Before: an attempt cancelled mid-call (the client left, a stream closed early) had no
``llmrouter.deployment.attempts`` and no CLIENT span. It is reported with outcome
``cancelled`` and is no failure of the deployment: no failure counted, no cooldown. A
stream closed once its answer was complete is a success."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmrouter import Router
from llmrouter.config import Config, Cooldown, Deployment, RouterConfig
from llmrouter.context import RequestContext
from llmrouter.dispatch import AttemptCancelledError
from llmrouter.errors import LLMRouterError
from llmrouter.hooks import RouterHooks
from llmrouter.telemetry import TelemetryHooks
from llmrouter.testing.scripted import ScriptedProvider, Step
from llmrouter.types import ChatChunk, ChunkChoice, Delta

pytestmark = pytest.mark.anyio

BODY = {"model": "g", "messages": [{"role": "user", "content": "hi"}]}


class Attempts(RouterHooks):
    def __init__(self) -> None:
        self.seen: list[tuple[str, LLMRouterError | None]] = []

    def on_attempt(self, ctx: RequestContext, deployment: str, error: LLMRouterError | None) -> None:
        self.seen.append((deployment, error))


class Setup:
    def __init__(self, step: Step, provider: type[ScriptedProvider] = ScriptedProvider) -> None:
        self.reader = InMemoryMetricReader()
        self.spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.attempts = Attempts()
        telemetry = TelemetryHooks(
            meter_provider=MeterProvider(metric_readers=[self.reader]),
            tracer_provider=tracer_provider,
            log_requests=False,
        )
        # One failure would cool the deployment down: a cancellation must not count as one.
        config = Config(router=RouterConfig(cooldown=Cooldown(failures=1, seconds=30)))
        self.router = Router(config, hooks=[self.attempts, telemetry])
        self.provider = provider(default=step)
        self.deployment = self.router.add_deployment(
            "g", self.provider, Deployment(provider="scripted", model="m", id="d0")
        )

    def outcomes(self) -> dict[str, float]:
        data = self.reader.get_metrics_data()
        return {
            str(point.attributes["llmrouter.outcome"]): point.value
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "llmrouter.deployment.attempts"
            for point in metric.data.data_points
        }

    def call_spans(self) -> list[Any]:
        return [span for span in self.spans.get_finished_spans() if span.kind.name == "CLIENT"]

    def assert_one_attempt(self, outcome: str) -> None:
        (seen,) = self.attempts.seen
        assert seen[0] == "d0"
        assert isinstance(seen[1], AttemptCancelledError) == (outcome == "cancelled")
        assert self.outcomes() == {outcome: 1}
        (span,) = self.call_spans()
        assert span.attributes["llmrouter.outcome"] == outcome
        # Not a failure of the deployment: counted as none, not cooled down.
        assert self.deployment.failures == 0 and self.deployment.cooldown_until == 0.0
        assert self.router.groups["g"].ordered() == [self.deployment]


async def test_a_call_cancelled_mid_call_is_one_cancelled_attempt() -> None:
    setup = Setup(Step(delay=10))
    with anyio.move_on_after(0.05):
        await setup.router.chat(BODY)
    assert setup.provider.record.cancelled == 1
    setup.assert_one_attempt("cancelled")


async def test_a_stream_cancelled_before_its_first_chunk_is_one_cancelled_attempt() -> None:
    setup = Setup(Step(delay=10))
    with anyio.move_on_after(0.05):
        [chunk async for chunk in setup.router.stream(BODY)]
    setup.assert_one_attempt("cancelled")


async def test_a_stream_closed_mid_answer_is_one_cancelled_attempt() -> None:
    setup = Setup(Step(text="one two three four", chunk_delay=0.001))
    stream = setup.router.stream(BODY)
    await stream.__anext__()
    await stream.aclose()
    setup.assert_one_attempt("cancelled")


async def test_a_stream_cancelled_while_waiting_for_a_chunk_is_one_cancelled_attempt() -> None:
    setup = Setup(Step(text="one two three four", chunk_delay=10))
    stream = setup.router.stream(BODY)
    await stream.__anext__()
    with anyio.move_on_after(0.05):
        await stream.__anext__()
    await stream.aclose()
    setup.assert_one_attempt("cancelled")


async def test_a_stream_closed_after_its_last_chunk_is_a_success() -> None:
    # The client had the whole answer (the finish reason came); the end of the upstream's
    # stream was just never read.
    setup = Setup(Step(text="one two"))
    stream = setup.router.stream(BODY)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            break
    await stream.aclose()
    setup.assert_one_attempt("ok")
    assert setup.deployment.requests == 1


class TwoAnswers(ScriptedProvider):
    """``n: 2`` as OpenAI streams it: a choice a chunk, choice 0 finishing first."""

    async def stream(self, request: Any) -> Any:
        def chunk(index: int, content: str | None = None, finish: str | None = None) -> ChatChunk:
            delta = Delta(content=content)
            return ChatChunk(
                id="x",
                created=0,
                model="m",
                choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish)],
            )

        yield chunk(0, "a")
        yield chunk(1, "b")
        yield chunk(0, finish="stop")
        await anyio.sleep(10)
        yield chunk(1, finish="stop")


async def test_a_stream_of_two_answers_closed_after_the_first_finished_is_cancelled() -> None:
    setup = Setup(Step(), TwoAnswers)
    stream = setup.router.stream({**BODY, "n": 2})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            break  # choice 1 is still being written
    await stream.aclose()
    setup.assert_one_attempt("cancelled")


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answered_request_is_one_ok_attempt(stream: bool) -> None:
    setup = Setup(Step(text="one two"))
    if stream:
        [chunk async for chunk in setup.router.stream(BODY)]
    else:
        await setup.router.chat(BODY)
    setup.assert_one_attempt("ok")
