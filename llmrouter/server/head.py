"""``HEAD`` on every ``GET`` route: the ``GET`` answer's status and headers, no body.

HTTP says a server answers ``HEAD`` as it would ``GET``, without the content (RFC 9110,
9.3.2), and probes, link checkers and some SDKs' health checks send it. Litestar routes
``HEAD`` apart from ``GET`` and refuses a ``HEAD`` handler whose response has a body, so
``HEAD /v1/models`` was a 405. :func:`answer_head_as_get` goes in front of the app's
router: a ``HEAD`` request is routed as ``GET`` (on a copy of the scope, so the server
still knows it answers ``HEAD`` and sends no body), and the body the handler produces is
dropped here; ``Content-Length`` stays the ``GET`` answer's. The copy carries
:data:`~llmrouter.asgi.HEAD_KEY`, from which :func:`~llmrouter.asgi.request_method`
gives telemetry the method the client sent.

Litestar's routes do not know of this, so the ``Allow`` header it sends (answering
``OPTIONS``, and in a 405) lists ``GET`` without ``HEAD``, where it must list every method
the resource answers (RFC 9110, 10.2.1): :func:`answer_head_as_get` adds ``HEAD`` to the
``OPTIONS`` answers, :func:`allow_head_in_405` to the 405s. Other methods pass through
untouched.
"""

from __future__ import annotations

from typing import Any

from llmrouter.asgi import HEAD_KEY

__all__ = ["allow_head_in_405", "answer_head_as_get"]

_EMPTY_END = {"type": "http.response.body", "body": b"", "more_body": False}


def _with_head(allow: str) -> str:
    """An ``Allow`` header's value, with ``HEAD`` listed where ``GET`` is."""
    methods = [method.strip() for method in allow.split(",")]
    if "GET" not in methods or "HEAD" in methods:
        return allow
    return ", ".join(sorted([*methods, "HEAD"]))


def answer_head_as_get(app: Any) -> Any:
    """``app`` (an ASGI callable that routes), answering ``HEAD`` with its ``GET`` routes."""

    async def handle(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        method = scope["method"]
        if method == "HEAD":
            await app({**scope, "method": "GET", HEAD_KEY: True}, receive, _without_body(send))
        elif method == "OPTIONS":
            await app(scope, receive, _listing_head(send))
        else:
            await app(scope, receive, send)

    return handle


def _without_body(send: Any) -> Any:
    async def send_head(message: Any) -> None:
        if message["type"] == "http.response.body":
            if message.get("more_body", False):
                return  # the content, which a HEAD answer does not have
            message = _EMPTY_END
        await send(message)

    return send_head


def _listing_head(send: Any) -> Any:
    async def send_options(message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = [_allowing_head(name, value) for name, value in message.get("headers", ())]
            message = {**message, "headers": headers}
        await send(message)

    return send_options


def _allowing_head(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    if name.lower() != b"allow":
        return name, value
    return name, _with_head(value.decode("latin-1")).encode("latin-1")


def allow_head_in_405(handler: Any) -> Any:
    """``handler`` (an exception handler rendering a 405), with ``HEAD`` in its ``Allow``
    header where ``GET`` is. Registered for Litestar's ``MethodNotAllowedException``, it
    costs the requests that a route answers nothing (wrapping ``send`` would)."""

    def handle(request: Any, exc: Any) -> Any:
        allow = exc.headers.get("allow") if exc.headers else None
        if allow is not None:
            exc.headers["allow"] = _with_head(allow)
        return handler(request, exc)

    return handle
