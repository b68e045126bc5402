"""The app's lifespan, in-process: a shutdown that cannot finish is given up at its
bound; a second Ctrl-C (uvicorn skips the app's shutdown, and the loop's end cancels the
lifespan) still shuts the app down; a stop during a stalled start-up ends it at once;
start-up failures say what timed out; the dashboard's media types."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
from litestar.testing import TestClient

from llmrouter.config import Config
from llmrouter.errors import one_line_cause
from llmrouter.extension import Extension
from llmrouter.router import Router
from llmrouter.server import app as app_module
from llmrouter.server import create_app
from llmrouter.server.startup import OneLineStartupFailure
from llmrouter.testing.scripted import ScriptedProvider, Step

pytestmark = pytest.mark.anyio


def _router() -> Router:
    router = Router()
    router.add_deployment("m", ScriptedProvider("upstream-m", steps=(), default=Step(echo=True)))
    return router


class Recorder(Extension):
    name = "recorder"

    def __init__(self, *, hang_at: str | None = None) -> None:
        self.hang_at = hang_at
        self.events: list[str] = []
        self.entered = asyncio.Event()

    async def startup(self) -> None:
        self.events.append("startup")
        if self.hang_at == "startup":
            self.entered.set()
            await asyncio.Event().wait()  # a database that never answers

    async def shutdown(self) -> None:
        self.events.append("shutdown")
        if self.hang_at == "shutdown":
            # A store that stopped answering, shielded from cancellation as a flush is.
            await asyncio.shield(asyncio.Event().wait())
        self.events.append("closed")


class Lifespan:
    """Drives an ASGI app's lifespan as uvicorn does, in a task of its own."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        self.task: asyncio.Task[None] | None = None

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self.task = asyncio.get_running_loop().create_task(self.app(scope, self.inbox.get, self._send))
        self.inbox.put_nowait({"type": "lifespan.startup"})

    async def until_sent(self, kind: str, within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while kind not in self.types():
            assert time.monotonic() < deadline, self.sent
            await asyncio.sleep(0.01)

    def types(self) -> list[str]:
        return [m["type"] for m in self.sent]


async def test_a_shutdown_that_cannot_finish_is_given_up_at_its_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: the lifespan waited for the extensions' shutdown however long it took (a
    # ledger flush to a PostgreSQL that stopped answering: for good).
    monkeypatch.setattr(app_module, "shutdown_bound", lambda config: 0.5)
    stuck = Recorder(hang_at="shutdown")
    lifespan = Lifespan(create_app(router=_router(), extensions=[stuck]))
    lifespan.start()
    await lifespan.until_sent("lifespan.startup.complete")
    started = time.monotonic()
    lifespan.inbox.put_nowait({"type": "lifespan.shutdown"})
    await lifespan.until_sent("lifespan.shutdown.complete")
    assert time.monotonic() - started < 2.5
    assert stuck.events == ["startup", "shutdown"]
    assert "shutdown still not done after 0.5s" in caplog.text


def test_the_shutdown_bound_follows_the_ledgers_timeout() -> None:
    config = Config()
    bound = (
        app_module.SETTLE_SECONDS
        + config.accounting.ledger.shutdown_timeout
        + app_module.CLOSE_MARGIN_SECONDS
    )
    assert app_module.shutdown_bound(config) == bound


async def test_a_lifespan_cancelled_without_a_shutdown_still_shuts_the_app_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # uvicorn after a second Ctrl-C: no lifespan.shutdown; the event loop's end cancels
    # the lifespan. Before: the extensions closed under that cancellation (tracebacks,
    # ledger rows left to the journal), and serve exited 0.
    recorder = Recorder()
    wrapped = OneLineStartupFailure(create_app(router=_router(), extensions=[recorder]))
    lifespan = Lifespan(wrapped)
    lifespan.start()
    await lifespan.until_sent("lifespan.startup.complete")
    assert lifespan.task is not None
    lifespan.task.cancel()
    await asyncio.wait({lifespan.task}, timeout=5)
    assert lifespan.task.done() and not lifespan.task.cancelled()
    lifespan.task.result()  # no error either
    assert recorder.events == ["startup", "shutdown", "closed"]
    assert lifespan.types()[-1] == "lifespan.shutdown.complete"
    assert wrapped.forced_exit is True
    assert "forced exit" in caplog.text


async def test_a_normal_shutdown_is_not_a_forced_exit() -> None:
    recorder = Recorder()
    wrapped = OneLineStartupFailure(create_app(router=_router(), extensions=[recorder]))
    lifespan = Lifespan(wrapped)
    lifespan.start()
    await lifespan.until_sent("lifespan.startup.complete")
    lifespan.inbox.put_nowait({"type": "lifespan.shutdown"})
    await lifespan.until_sent("lifespan.shutdown.complete")
    assert recorder.events == ["startup", "shutdown", "closed"]
    assert wrapped.forced_exit is False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_during_a_stalled_start_up_ends_it_at_once(signum: int) -> None:
    # uvicorn's handler only notes the signal; it acted once the start-up was over (a
    # connect to a silent database: 60 s), and then exited 3, start-up failed.
    noted: list[int] = []

    def handle_exit(sig: int, frame: Any) -> None:  # uvicorn's
        noted.append(sig)

    previous = signal.signal(signum, handle_exit)
    try:
        recorder = Recorder(hang_at="startup")
        lifespan = Lifespan(OneLineStartupFailure(create_app(router=_router(), extensions=[recorder])))
        lifespan.start()
        await asyncio.wait_for(recorder.entered.wait(), 5)
        started = time.monotonic()
        os.kill(os.getpid(), signum)
        await lifespan.until_sent("lifespan.startup.complete", within=2)
        assert time.monotonic() - started < 1
        assert noted == [signum]  # uvicorn heard it too: it shuts down at once
        assert recorder.events == ["startup", "shutdown", "closed"]  # what had started closed
        assert "lifespan.startup.failed" not in lifespan.types()  # uvicorn would exit 3
        assert signal.getsignal(signum) == handle_exit  # ours is gone, uvicorn's is back
        lifespan.inbox.put_nowait({"type": "lifespan.shutdown"})
        await lifespan.until_sent("lifespan.shutdown.complete")
        assert lifespan.task is not None
        await asyncio.wait_for(lifespan.task, 2)
    finally:
        signal.signal(signum, previous)


async def test_after_start_up_signals_are_uvicorns_alone() -> None:
    handler = lambda sig, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        lifespan = Lifespan(OneLineStartupFailure(create_app(router=_router(), extensions=[Recorder()])))
        lifespan.start()
        await lifespan.until_sent("lifespan.startup.complete")
        assert signal.getsignal(signal.SIGTERM) is handler
        lifespan.inbox.put_nowait({"type": "lifespan.shutdown"})
        await lifespan.until_sent("lifespan.shutdown.complete")
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_timeout_is_reported_as_such_not_as_its_cancellation() -> None:
    def chained(outer: BaseException, inner: BaseException) -> BaseException:
        try:
            raise outer from inner
        except BaseException as exc:  # noqa: BLE001
            return exc

    bare = chained(TimeoutError(), asyncio.CancelledError())  # asyncio.wait_for's
    assert one_line_cause(bare) == "TimeoutError"
    worded = chained(TimeoutError("timed out connecting to postgresql://db/x after 10 s"), bare)
    assert one_line_cause(worded) == "TimeoutError: timed out connecting to postgresql://db/x after 10 s"
    refused = chained(RuntimeError("(asyncpg) wrapped"), ConnectionRefusedError(111, "Connection refused"))
    assert one_line_cause(refused) == "ConnectionRefusedError: [Errno 111] Connection refused"


@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/dashboard", "text/html; charset=utf-8"),
        ("/dashboard/dashboard.js", "text/javascript; charset=utf-8"),
        ("/dashboard/dashboard.css", "text/css; charset=utf-8"),
    ],
)
def test_dashboard_media_types_name_their_charset_once(path: str, media_type: str) -> None:
    # It was "text/html; charset=utf-8; charset=utf-8".
    with TestClient(create_app(router=_router())) as client:
        assert client.get(path).headers["content-type"] == media_type
        assert client.head(path).headers["content-type"] == media_type
