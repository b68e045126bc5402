"""``POST /v1/completions``: the legacy prompt API, JSON or a server-sent event stream."""

from __future__ import annotations

from typing import Any

from litestar import Request, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.response.base import ASGIResponse

from llmrouter.server.answer import answer
from llmrouter.server.openapi import documented_body
from llmrouter.types import CompletionRequest, CompletionResponse, decode_completion_request

__all__ = ["completion_handlers", "create_completion"]


_OPENAPI: dict[str, Any] = dict(
    summary="Create a text completion (legacy OpenAI API)",
    description="With `stream: true` the answer is a `text/event-stream` ending with `data: [DONE]`.",
    responses={200: ResponseSpec(data_container=CompletionResponse, description="The completion")},
    tags=["openai"],
    operation_id="createCompletion",
    dependencies=documented_body(CompletionRequest, {"model": "mock-gpt", "prompt": "Say this is a test"}),
)


async def create_completion(request: Request[Any, Any, Any]) -> ASGIResponse:
    return await answer(request, decode_completion_request, "complete", "stream_complete")


completion_handlers = [
    post("/v1/completions", status_code=200, **_OPENAPI)(create_completion),
    post("/completions", status_code=200, include_in_schema=False)(create_completion),
]
