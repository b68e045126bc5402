"""Token counts of requests and answers, off the event loop when they are long.

The router counts a priced request's prompt to bound its cost, and the tokens of an
answer whose provider reported none; accounting counts an unpriced request's prompt when
a TPM limit applies to it (nothing else needed the count).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from llmrouter.errors import NestedTooDeeplyError
from llmrouter.tokens import (
    count_messages,
    count_prompt,
    count_text,
    encoding_loaded,
    preload_encodings,
    tools_text,
)
from llmrouter.types import ChatRequest, CompletionRequest, Usage, message_text

if TYPE_CHECKING:
    from llmrouter.context import RequestContext

__all__ = ["count_in_worker", "estimate_prompt", "estimated_usage"]

# Texts longer than this are counted in a worker thread: tiktoken takes ~0.1 s a
# megabyte, which would stall every other request on the event loop.
_INLINE_COUNT_CHARS = 64_000


async def count_in_worker(
    count: Callable[[Any, str], int], text: Any, model: str, size: int | None = None
) -> int:
    """Tokens of ``text`` (a string, or messages with ``size`` characters) for ``model``,
    never blocking the event loop on a file load or a very long text."""
    if not encoding_loaded(model):
        await anyio.to_thread.run_sync(preload_encodings, [model])
    if (len(text) if size is None else size) < _INLINE_COUNT_CHARS:
        return count(text, model)
    return await anyio.to_thread.run_sync(count, text, model)


async def estimate_prompt(request: ChatRequest | CompletionRequest, model: str) -> int:
    """The prompt's tokens as an upstream bills them: a chat's messages and its tool
    definitions (as their JSON), or a completion's prompt(s)."""
    if not isinstance(request, ChatRequest):
        return await count_in_worker(count_prompt, request.prompt, model)
    size = sum(len(message_text(message)) for message in request.messages)
    prompt = await count_in_worker(count_messages, request.messages, model, size)
    if request.tools:  # upstreams bill tool definitions as prompt
        try:
            text = tools_text(request.tools)
        except RecursionError as exc:
            raise NestedTooDeeplyError from exc
        prompt += await count_in_worker(count_text, text, model)
    return prompt


async def estimated_usage(ctx: RequestContext, completion_text: str) -> Usage:
    """Usage counted by llmrouter (estimated) for an answer whose provider reported none:
    ``ctx``'s prompt (its estimate, when the router made one) and ``completion_text``."""
    request = ctx.request
    model = ctx.upstream_model or (request.model if request is not None else "")
    prompt = ctx.prompt_tokens_estimate
    if not prompt and request is not None:
        prompt = await estimate_prompt(request, model)
    completion = await count_in_worker(count_text, completion_text, model)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion, estimated=True
    )
