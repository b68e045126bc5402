"""``POST /v1/chat/completions``: JSON or a server-sent event stream."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from litestar import Request, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example
from litestar.response.base import ASGIResponse

from llmrouter.server.body import read_body
from llmrouter.server.disconnect import by_the_server, call_until_disconnect, shutting_down
from llmrouter.server.responses import json_response
from llmrouter.server.sse import open_stream
from llmrouter.server.state import response_headers, service_of
from llmrouter.types import ChatResponse, decode_chat_request

__all__ = ["chat_handlers", "create_chat_completion"]

_OPENAPI: dict[str, Any] = dict(
    summary="Create a chat completion (OpenAI-compatible)",
    description=(
        "Body: an OpenAI chat completion request. With `stream: true` the answer is a "
        "`text/event-stream` of `chat.completion.chunk` events ending with `data: [DONE]`."
    ),
    responses={200: ResponseSpec(data_container=ChatResponse, description="The completion")},
    tags=["openai"],
    operation_id="createChatCompletion",
    examples=[Example(value={"model": "mock-gpt", "messages": [{"role": "user", "content": "Hi"}]})],
)


async def create_chat_completion(request: Request[Any, Any, Any]) -> ASGIResponse:
    try:
        service = service_of(request)
        ctx = await service.new_context(request)
        chat_request = decode_chat_request(await read_body(request))
        router = service.active_router
        if chat_request.stream:
            return await open_stream(
                request.receive,
                router.stream(chat_request, context=ctx),
                partial(response_headers, ctx, with_cost=False),
                ctx.request_id,
            )
        response = await call_until_disconnect(
            request.receive, partial(router.chat, chat_request, context=ctx)
        )
        return json_response(response, response_headers(ctx))
    except asyncio.CancelledError:
        # The server cancelled the task at the end of its drain while the body was still
        # arriving or the credentials being checked (call_until_disconnect answers for
        # the router's part): the documented 503, not the server's plain-text 500.
        if not by_the_server():
            raise
        raise shutting_down() from None


chat_handlers = [
    post("/v1/chat/completions", status_code=200, **_OPENAPI)(create_chat_completion),
    # The same API without the /v1 prefix, for clients configured with a bare base URL.
    post("/chat/completions", status_code=200, include_in_schema=False)(create_chat_completion),
]
