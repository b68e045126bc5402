"""The app ``llmrouter serve`` runs: a start-up that fails is logged in one line.

Litestar answers a failed lifespan start-up with the formatted traceback, which uvicorn
logs: a hundred lines through SQLAlchemy, asyncpg and anyio to say that PostgreSQL
refused the connection. :class:`OneLineStartupFailure` holds that answer back and sends
the :class:`~llmrouter.server.app.StartupError`'s message instead (which part failed,
and the innermost cause). Failures that are not a ``StartupError`` keep their traceback.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from llmrouter.server.app import StartupError, config_from_env, create_app, default_extensions

__all__ = ["OneLineStartupFailure", "serve_app_from_env"]


class OneLineStartupFailure:
    """Wraps an ASGI app; requests go straight to it, without a coroutine of their own
    (serve it with ``interface="asgi3"``: uvicorn cannot tell from a plain ``__call__``)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        if scope["type"] == "lifespan":
            return self._lifespan(scope, receive, send)
        return self.app(scope, receive, send)

    async def _lifespan(self, scope: Any, receive: Any, send: Any) -> None:
        held: list[dict[str, Any]] = []

        async def hold_failure(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)  # sent once the error that follows it is known
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_failure)
        except BaseException as exc:
            if held:
                failure = _startup_error(exc)
                await send(held[0] if failure is None else {**held[0], "message": str(failure)})
            raise
        for message in held:  # the app reported a failure without raising
            await send(message)


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
    if config.telemetry.json_logs:
        configure_logging(config.telemetry.log_level)
    else:
        configure_plain_logging()  # as the parent's: a worker is a process of its own
    return OneLineStartupFailure(create_app(config, extensions=default_extensions(config)))
