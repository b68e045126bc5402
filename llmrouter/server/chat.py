"""``POST /v1/chat/completions``: JSON or a server-sent event stream."""

from __future__ import annotations

from typing import Any

from litestar import Request, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.response.base import ASGIResponse

from llmrouter.server.answer import answer
from llmrouter.server.openapi import documented_body
from llmrouter.types import ChatRequest, ChatResponse, decode_chat_request

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
    dependencies=documented_body(
        ChatRequest, {"model": "mock-gpt", "messages": [{"role": "user", "content": "Hi"}]}
    ),
)


async def create_chat_completion(request: Request[Any, Any, Any]) -> ASGIResponse:
    return await answer(request, decode_chat_request, "chat", "stream")


chat_handlers = [
    post("/v1/chat/completions", status_code=200, **_OPENAPI)(create_chat_completion),
    # The same API without the /v1 prefix, for clients configured with a bare base URL.
    post("/chat/completions", status_code=200, include_in_schema=False)(create_chat_completion),
]
