"""A CORS preflight from an origin not in ``server.cors_origins``, refused OpenAI-style.

Litestar's CORS middleware answers such a preflight itself, before any exception handler
of the service: a plain-text ``400 Disallowed CORS Origin``, where every other error of the
service is an OpenAI error body. :func:`openai_style_cors_refusals` goes in front of the
app and rewrites that one answer; every other message passes through untouched.
"""

from __future__ import annotations

from typing import Any

import msgspec

from llmrouter.server.errors import error_body

__all__ = ["openai_style_cors_refusals"]


def _is_preflight(scope: Any) -> bool:
    return (
        scope["type"] == "http"
        and scope["method"] == "OPTIONS"
        and any(name == b"access-control-request-method" for name, _ in scope["headers"])
    )


def _origin(scope: Any) -> str:
    for name, value in scope["headers"]:
        if name == b"origin":
            return str(value.decode("latin-1"))
    return ""


def openai_style_cors_refusals(app: Any) -> Any:
    """``app`` (an ASGI callable with CORS on), its refused preflights in OpenAI's shape."""

    async def handle(scope: Any, receive: Any, send: Any) -> None:
        if not _is_preflight(scope):
            await app(scope, receive, send)
            return
        refused = False

        async def send_refusal_as_json(message: Any) -> None:
            nonlocal refused
            if message["type"] == "http.response.start" and message["status"] == 400:
                refused = True
                body = msgspec.json.encode(
                    error_body(
                        f"origin {_origin(scope)!r} is not allowed (server.cors_origins)",
                        "invalid_request_error",
                        "cors_origin_not_allowed",
                    )
                )
                headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
                await send({**message, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
            elif not refused:
                await send(message)

        await app(scope, receive, send_refusal_as_json)

    return handle
