"""``HEAD`` on every ``GET`` route: the ``GET`` answer's status and headers, no body.

HTTP says a server answers ``HEAD`` as it would ``GET``, without the content (RFC 9110,
9.3.2), and probes, link checkers and some SDKs' health checks send it. Litestar routes
``HEAD`` apart from ``GET`` and refuses a ``HEAD`` handler whose response has a body, so
``HEAD /v1/models`` was a 405. :func:`answer_head_as_get` goes in front of the app's
router: a ``HEAD`` request is routed as ``GET`` (on a copy of the scope, so the server
still knows it answers ``HEAD`` and sends no body), and the body the handler produces is
dropped here; ``Content-Length`` stays the ``GET`` answer's. The copy carries
:data:`~llmrouter.asgi.HEAD_KEY`, from which :func:`~llmrouter.asgi.request_method`
gives telemetry the method the client sent. Other methods pass through untouched.
"""

from __future__ import annotations

from typing import Any

from llmrouter.asgi import HEAD_KEY

__all__ = ["answer_head_as_get"]

_EMPTY_END = {"type": "http.response.body", "body": b"", "more_body": False}


def answer_head_as_get(app: Any) -> Any:
    """``app`` (an ASGI callable that routes), answering ``HEAD`` with its ``GET`` routes."""

    async def handle(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await app(scope, receive, send)
            return

        async def send_head(message: Any) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # the content, which a HEAD answer does not have
                message = _EMPTY_END
            await send(message)

        await app({**scope, "method": "GET", HEAD_KEY: True}, receive, send_head)

    return handle
