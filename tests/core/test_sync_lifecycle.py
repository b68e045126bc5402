"""SyncRouter: Ctrl-C cancels the request, providers added later are started, the
calls match Router's, close() may be called twice, ends the streams left open and is
what calls after it report, and a router never closed is closed at exit."""

import inspect
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import pytest

from llmrouter import Router, RouterHooks, SyncRouter
from llmrouter.testing.scripted import ScriptedProvider, Step

HI = {"model": "g", "messages": [{"role": "user", "content": "hi"}]}
# Seconds after which a call still running is taken for a hang: it fails the test instead
# of hanging the suite. No timing is asserted.
HANG = 30


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


def in_thread(func: Callable[[], object]) -> tuple[threading.Thread, list[Exception]]:
    """Start ``func`` in a daemon thread (one that hangs cannot hold up the exit); the list
    receives what it raises."""
    errors: list[Exception] = []

    def run() -> None:
        try:
            func()
        except Exception as exc:  # noqa: BLE001 - the test raises it again
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def finishes(func: Callable[[], object]) -> bool:
    """Whether ``func()`` returns (raising what it raises) rather than hangs."""
    thread, errors = in_thread(func)
    thread.join(HANG)
    if errors:
        raise errors[0]
    return not thread.is_alive()


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


def test_leaving_the_block_with_a_stream_open_cancels_it():
    # It hung: the open stream's task kept the loop thread from stopping.
    class NotesCancelledAtClose(ScriptedProvider):
        async def aclose(self) -> None:
            self.cancelled_at_close = self.record.cancelled
            await super().aclose()

    provider = NotesCancelledAtClose(default=Step(text="a b c d", chunk_delay=5.0))
    hooks = Statuses()
    router = SyncRouter(hooks=[hooks])
    deployment = router.router.add_deployment("g", provider)

    def leave_a_stream_open() -> None:
        with router:
            chunks = router.stream(HI)
            next(chunks)  # as a loop left by break or by an exception; chunks is still referenced

    assert finishes(leave_a_stream_open), "leaving the block hung"
    # The stream ended before its provider was closed, as leaving an `async for` would.
    assert provider.cancelled_at_close == 1 and hooks.statuses == ["cancelled"]
    assert deployment.in_flight == 0 and provider.closed


def test_close_cancels_a_stream_another_thread_waits_on():
    provider = ScriptedProvider(default=Step(text="a b c d", chunk_delay=5.0))
    router = SyncRouter()
    router.router.add_deployment("g", provider)
    chunks = router.stream(HI)
    next(chunks)
    consumer, _ = in_thread(lambda: next(chunks))
    while inspect.getgeneratorstate(chunks) != inspect.GEN_RUNNING:  # type: ignore[arg-type]
        time.sleep(0.01)
    assert finishes(router.close), "close() hung"
    consumer.join(HANG)
    assert not consumer.is_alive()
    assert provider.record.cancelled == 1 and provider.closed


def test_calls_after_close_say_it_is_closed():
    router = SyncRouter()
    router.router.add_deployment("g", ScriptedProvider())
    made_before = router.stream(HI)
    router.close()
    calls = [lambda: router.chat(HI), lambda: list(router.stream(HI)), lambda: next(made_before)]
    for call in [*calls, router.list_models]:
        with pytest.raises(RuntimeError, match="SyncRouter is closed"):
            call()


def test_a_script_that_never_closes_exits_and_closes_its_providers():
    script = textwrap.dedent(f"""
        import atexit
        from llmrouter import SyncRouter
        from llmrouter.testing.scripted import ScriptedProvider

        provider = ScriptedProvider()
        atexit.register(lambda: print("provider closed:", provider.closed))  # runs after the router's
        router = SyncRouter()
        router.router.add_deployment("g", provider)
        router.chat({HI!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "provider closed: True"
