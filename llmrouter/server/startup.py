"""The app ``llmrouter serve`` runs: a start-up that fails is logged in one line; a stop
asked for during start-up, or a second Ctrl-C, ends the service as a stop should.

Litestar answers a failed lifespan start-up with the formatted traceback, which uvicorn
logs: a hundred lines through SQLAlchemy, asyncpg and anyio to say that PostgreSQL
refused the connection. :class:`OneLineStartupFailure` holds that answer back and sends
the :class:`~llmrouter.server.app.StartupError`'s message instead (which part failed,
and the innermost cause). Failures that are not a ``StartupError`` keep their traceback.

uvicorn notes SIGTERM or Ctrl-C during the app's start-up, but acts on it only once the
start-up is over: one stalled on its database held the process that long, and then
exited 3 (start-up failed), which a supervisor restarts. Here the signal also cancels
the start-up: what had started closes, uvicorn is told the start-up is over, and goes
on to its shutdown at once; the process ends as a stopped service does.

A second Ctrl-C makes uvicorn skip the app's shutdown: its event loop's end cancelled
the lifespan, and with it the closing of the ledger (tracebacks, rows left to the
journal). Here the lifespan takes that cancellation as the shutdown it was not sent: the
requests still running are being cancelled too (billed ``cancelled``, their rows
written), the ledger flushes, and :attr:`OneLineStartupFailure.forced_exit` tells
``llmrouter serve`` to exit with status 130.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable
from types import FrameType
from typing import Any

from llmrouter.server.app import StartupError, config_from_env, create_app, default_extensions

__all__ = ["OneLineStartupFailure", "serve_app_from_env"]

logger = logging.getLogger("llmrouter.server")

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class OneLineStartupFailure:
    """Wraps an ASGI app; requests go straight to it, without a coroutine of their own
    (serve it with ``interface="asgi3"``: uvicorn cannot tell from a plain ``__call__``)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.forced_exit = False
        """The server ended without asking the app to shut down (uvicorn after a second
        Ctrl-C); the app shut down all the same."""

    def __call__(self, scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        if scope["type"] == "lifespan":
            return self._lifespan(scope, receive, send)
        return self.app(scope, receive, send)

    async def _lifespan(self, scope: Any, receive: Any, send: Any) -> None:
        held: list[dict[str, Any]] = []
        task = asyncio.current_task()
        assert task is not None
        stop = _StopDuringStartup(task)
        started = False

        async def app_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"].startswith("lifespan.startup."):
                stop.disarm()
            if message["type"] == "lifespan.startup.complete":
                started = True
            if message["type"] == "lifespan.startup.failed":
                held.append(message)  # sent once the error that follows it is known
            else:
                await send(message)

        async def app_receive() -> dict[str, Any]:
            while True:
                try:
                    return dict(await receive())
                except asyncio.CancelledError:
                    if not started:
                        raise
                    task.uncancel()
                    if stop.take_cancel():
                        continue  # ours, come after the start-up was over: uvicorn's shutdown follows
                    # The loop is ending without a lifespan.shutdown: uvicorn's forced exit.
                    self.forced_exit = True
                    logger.warning(
                        "forced exit (Ctrl-C during the shutdown): the requests still running "
                        "are cancelled; shutting down"
                    )
                    return {"type": "lifespan.shutdown"}

        stop.arm()
        try:
            await self.app(scope, app_receive, app_send)
        except BaseException as exc:
            stop.disarm()
            if stop.requested and not started:
                if isinstance(exc, asyncio.CancelledError) and stop.take_cancel():
                    task.uncancel()
                await self._stopped_during_startup(stop, receive, send)
                return
            if held:
                failure = _startup_error(exc)
                await send(held[0] if failure is None else {**held[0], "message": str(failure)})
            raise
        finally:
            stop.disarm()
        for message in held:  # the app reported a failure without raising
            await send(message)

    @staticmethod
    async def _stopped_during_startup(stop: _StopDuringStartup, receive: Any, send: Any) -> None:
        """What had started has closed; uvicorn, which has the stop noted, is told that
        the start-up is over and shuts down at once (it exits 3 after a failed one)."""
        logger.info("stop requested during start-up: shutting down without starting")
        await send({"type": "lifespan.startup.complete"})
        while True:
            try:
                if (await receive())["type"] == "lifespan.shutdown":
                    break
            except asyncio.CancelledError:
                if not stop.take_cancel():  # ours, come late (the app did not let it through)
                    raise
                stop.task.uncancel()
        await send({"type": "lifespan.shutdown.complete"})


class _StopDuringStartup:
    """While armed, SIGINT and SIGTERM, besides what uvicorn does with them, cancel the
    start-up (``task``). Only where uvicorn handles them (a Python handler in the main
    thread): nothing changes elsewhere."""

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self._loop = task.get_loop()
        self._previous: dict[int, Any] = {}
        self._armed = False
        self._cancels = 0
        self._cancelled = False
        self.requested = False

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _STOP_SIGNALS:
            previous = signal.getsignal(sig)
            if callable(previous) and previous is not signal.default_int_handler:
                self._previous[sig] = previous
                signal.signal(sig, self._handle)
        self._armed = bool(self._previous)

    def disarm(self) -> None:
        self._armed = False
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, handler)

    def take_cancel(self) -> bool:
        """Whether a cancellation is one this issued (counted once)."""
        if self._cancels:
            self._cancels -= 1
            return True
        return False

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        previous = self._previous.get(sig)
        if previous is not None:
            previous(sig, frame)  # uvicorn notes it: it shuts down once the start-up is over
        self.requested = True
        self._loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        if self._armed and not self._cancelled and not self.task.done():
            self._cancelled = True  # once: two cancels before it runs are one CancelledError
            self._cancels += 1
            self.task.cancel()


def _startup_error(exc: BaseException) -> StartupError | None:
    if isinstance(exc, StartupError):
        return exc
    for inner in getattr(exc, "exceptions", ()):  # an exception group
        found = _startup_error(inner)
        if found is not None:
            return found
    return None


def serve_app_from_env() -> OneLineStartupFailure:
    """The app factory of each worker of multi-worker ``llmrouter serve``: its log is set
    up as the parent's is (JSON from the first line when the config asks for it)."""
    from llmrouter.telemetry.logging import configure_logging, configure_plain_logging

    config = config_from_env()
    if not config.telemetry.json_logs:
        configure_plain_logging()  # as the parent's: a worker is a process of its own
    configure_logging(config.telemetry.log_level, json_lines=config.telemetry.json_logs)
    return OneLineStartupFailure(create_app(config, extensions=default_extensions(config)))
