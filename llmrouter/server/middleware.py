"""Request id and timing headers.

``X-Request-ID`` is the client's when it sent one (so a trace can be followed across
services), else a fresh one; the handler reads it from the scope to put it into the
:class:`~llmrouter.context.RequestContext`. ``X-Process-Time`` is the seconds from the
request reaching this middleware to the response headers leaving it (for a stream, the
time to the first event).

Once the response is sent, it calls the extensions' response observers (see
:meth:`~llmrouter.extension.Extension.response_observers`).

It runs per route: errors the router answers itself (404, 405) get their id from the
exception handlers in :mod:`llmrouter.server.errors` instead of a ``before_send`` hook,
which would be called for every message sent, each streamed chunk included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware

from llmrouter.ids import request_id_of
from llmrouter.server.drain import InFlight

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

    from llmrouter.extension import ResponseObserver

__all__ = ["STATUS_KEY", "RequestIdMiddleware"]

log = logging.getLogger("llmrouter.server")

STATUS_KEY = "llmrouter.response_status"
"""Where :class:`RequestIdMiddleware` keeps the response's status in the ASGI scope,
for the middleware inside it (telemetry) to read instead of watching every message."""


class RequestIdMiddleware(ASGIMiddleware):
    """Adds ``X-Request-ID`` and ``X-Process-Time`` to every routed HTTP response, then
    tells ``observers`` how it went."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, observers: Sequence[ResponseObserver] = (), in_flight: InFlight | None = None) -> None:
        self.observers = tuple(observers)
        self.in_flight = in_flight or InFlight()

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        started = time.perf_counter()
        request_id = request_id_of(scope).encode("latin-1")

        def send_with_headers(message: Message) -> Awaitable[None]:
            # Returns the server's awaitable: no coroutine of its own per message.
            if message["type"] == "http.response.start":
                scope[STATUS_KEY] = message["status"]  # type: ignore[literal-required]
                # Formatted as bytes, in one list display: the same headers for ~1k
                # fewer instructions than an f-string encoded and two appends.
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", request_id),
                    (b"x-process-time", b"%.6f" % (time.perf_counter() - started)),
                ]
            return send(message)

        self.in_flight.count += 1
        try:
            await next_app(scope, receive, send_with_headers)
        finally:
            self.in_flight.leave()
            # The observers are called here rather than from a method of their own: a
            # call less for every request.
            if self.observers:
                elapsed = time.perf_counter() - started
                # No response started means the app raised: the server answers 500.
                status = scope.get(STATUS_KEY, 500)
                for observe in self.observers:
                    try:
                        observe(scope, status, elapsed)  # type: ignore[arg-type]  # Litestar types the scope as a TypedDict
                    except Exception:
                        log.exception("response observer %r failed", observe)
