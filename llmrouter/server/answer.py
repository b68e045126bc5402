"""One completion request's way through the service: key, body, router, answer.

``POST /v1/chat/completions`` and ``POST /v1/completions`` differ only in how the body
decodes and which router calls answer it; the rest is here once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

from litestar import Request
from litestar.response.base import ASGIResponse

from llmrouter.errors import InvalidRequestError
from llmrouter.server.body import read_body
from llmrouter.server.disconnect import by_the_server, call_until_disconnect, shutting_down
from llmrouter.server.responses import json_response
from llmrouter.server.sse import open_stream
from llmrouter.server.state import response_headers, service_of

__all__ = ["answer"]


async def answer(
    request: Request[Any, Any, Any], decode: Callable[[bytes], Any], call: str, stream: str
) -> ASGIResponse:
    """Authenticate, decode the body with ``decode``, and answer through the router's
    method named ``call`` (JSON) or ``stream`` (a server-sent event stream).

    The server cancels the task at the end of its drain; wherever that finds the request
    (the body still arriving, the key being checked, the router), the client gets the
    documented 503 ``server_shutting_down``, not the server's plain-text 500.
    """
    try:
        service = service_of(request)
        ctx = await service.new_context(request)
        decoded = decode(await read_body(request))
        if decoded.stream_options is not None and not decoded.stream:
            raise InvalidRequestError(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
        router = service.active_router
        if decoded.stream:
            return await open_stream(
                request.receive,
                getattr(router, stream)(decoded, context=ctx),
                partial(response_headers, ctx, with_cost=False),
                ctx.request_id,
            )
        response = await call_until_disconnect(
            request.receive, partial(getattr(router, call), decoded, context=ctx)
        )
        return json_response(response, response_headers(ctx))
    except asyncio.CancelledError:
        if not by_the_server():
            raise  # the client left, or an enclosing cancel scope
        raise shutting_down() from None
