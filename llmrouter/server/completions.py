"""``POST /v1/completions``: the legacy prompt API, JSON or a server-sent event stream."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from litestar import Request, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.response.base import ASGIResponse

from llmrouter.server.body import read_body
from llmrouter.server.disconnect import by_the_server, call_until_disconnect, shutting_down
from llmrouter.server.responses import json_response
from llmrouter.server.sse import open_stream
from llmrouter.server.state import response_headers, service_of
from llmrouter.types import CompletionResponse, decode_completion_request

__all__ = ["completion_handlers", "create_completion"]


_OPENAPI: dict[str, Any] = dict(
    summary="Create a text completion (legacy OpenAI API)",
    description="With `stream: true` the answer is a `text/event-stream` ending with `data: [DONE]`.",
    responses={200: ResponseSpec(data_container=CompletionResponse, description="The completion")},
    tags=["openai"],
    operation_id="createCompletion",
)


async def create_completion(request: Request[Any, Any, Any]) -> ASGIResponse:
    try:
        service = service_of(request)
        ctx = await service.new_context(request)
        completion_request = decode_completion_request(await read_body(request))
        router = service.active_router
        if completion_request.stream:
            return await open_stream(
                request.receive,
                router.stream_complete(completion_request, context=ctx),
                partial(response_headers, ctx, with_cost=False),
                ctx.request_id,
            )
        response = await call_until_disconnect(
            request.receive, partial(router.complete, completion_request, context=ctx)
        )
        return json_response(response, response_headers(ctx))
    except asyncio.CancelledError:
        # As in create_chat_completion: the server's cancellation at the end of its drain,
        # during the body or the authentication, is the documented 503.
        if not by_the_server():
            raise
        raise shutting_down() from None


completion_handlers = [
    post("/v1/completions", status_code=200, **_OPENAPI)(create_completion),
    post("/completions", status_code=200, include_in_schema=False)(create_completion),
]
