"""SyncRouter: Ctrl-C cancels the request, providers added later are started, the
calls match Router's, and close() may be called twice."""

import signal
import threading
import time
from contextlib import contextmanager

import pytest

from llmrouter import Router, RouterHooks, SyncRouter
from llmrouter.testing.scripted import ScriptedProvider, Step

HI = {"model": "g", "messages": [{"role": "user", "content": "hi"}]}


class Statuses(RouterHooks):
    def __init__(self) -> None:
        self.statuses: list[str | None] = []

    async def after_request(self, ctx) -> None:
        self.statuses.append(ctx.status)


@contextmanager
def ctrl_c_after(seconds: float):
    """A KeyboardInterrupt in this (the main) thread after ``seconds``, as Ctrl-C raises it."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_ctrl_c_during_chat_cancels_the_request():
    provider = ScriptedProvider(default=Step(text="slow", delay=5.0))
    hooks = Statuses()
    started = time.monotonic()
    with SyncRouter(hooks=[hooks]) as router:
        deployment = router.router.add_deployment("g", provider)
        with pytest.raises(KeyboardInterrupt), ctrl_c_after(0.2):
            router.chat(HI)
        # The request has unwound when the interrupt reaches the caller.
        assert deployment.in_flight == 0 and provider.record.cancelled == 1
        assert hooks.statuses == ["cancelled"]
    assert time.monotonic() - started < 3, "leaving the block waited for the upstream"
    assert provider.record.completed == 0


def test_ctrl_c_while_a_stream_waits_for_a_chunk_cancels_it():
    # It surfaced as RuntimeError('aclose(): asynchronous generator is already running').
    provider = ScriptedProvider(default=Step(text="a b c d", chunk_delay=5.0))
    hooks = Statuses()
    chunks = []
    with SyncRouter(hooks=[hooks]) as router:
        deployment = router.router.add_deployment("g", provider)
        with pytest.raises(KeyboardInterrupt), ctrl_c_after(0.3):
            for chunk in router.stream(HI):
                chunks.append(chunk)
        assert len(chunks) == 1 and deployment.in_flight == 0
        assert hooks.statuses == ["cancelled"] and provider.record.cancelled == 1


def test_a_provider_added_after_construction_is_started():
    class NeedsStart(ScriptedProvider):
        async def chat(self, request):
            if not self.started:
                raise RuntimeError("used before start()")
            return await super().chat(request)

    with SyncRouter() as router:  # started at construction
        provider = NeedsStart(default=Step(text="ok"))
        router.router.add_deployment("g", provider)
        assert router.chat(HI).choices[0].message.content == "ok"


def test_stream_complete_and_a_second_close():
    router = SyncRouter()
    provider = ScriptedProvider(default=Step(text="x y"))
    router.router.add_deployment("g", provider)
    chunks = list(router.stream_complete({"model": "g", "prompt": "hi"}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "x y"
    router.close()
    router.close()
    assert provider.closed


def test_router_keywords_with_a_router_are_refused():
    with pytest.raises(TypeError, match="hooks"):
        SyncRouter(Router(), hooks=[Statuses()])
