"""The cache key: a hash of the canonical encoding of what changes the answer.

Two requests share a key exactly when an upstream would be asked the same thing:
same model group, messages, tools, sampling parameters, output limit, response
format, seed and unknown pass-through fields. What does not change the answer is
left out: ``stream`` / ``stream_options`` (a cached answer can be replayed either
way), ``user``, the request id and the API key (unless the cache is namespaced by
key, in which case each key gets its own keyspace).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from llmrouter.types import ChatRequest

__all__ = ["KEY_VERSION", "cache_key", "canonical_request"]

KEY_VERSION = 1
"""Bumped when the canonical form changes, so old entries are simply never found."""

# Sorted keys make dicts (tool schemas, logit_bias, extra fields) order-independent.
_encoder = msgspec.json.Encoder(order="sorted")


def canonical_request(request: ChatRequest, model_group: str | None = None) -> dict[str, Any]:
    """The answer-changing part of a chat request, as plain data.

    Args:
        request: the decoded chat request.
        model_group: the resolved model group (aliases of one group share entries);
            defaults to the requested model name.
    """
    return {
        "v": KEY_VERSION,
        "op": "chat",
        "model": model_group or request.model,
        "messages": request.messages,
        "tools": request.tools,
        "tool_choice": request.tool_choice,
        "parallel_tool_calls": request.parallel_tool_calls,
        "response_format": request.response_format,
        "temperature": request.temperature,
        "top_p": request.top_p,
        # max_tokens and max_completion_tokens mean the same limit for the answer.
        "output_limit": request.output_limit,
        "n": request.n if request.n != 1 else None,
        "stop": request.stop_list or None,
        "seed": request.seed,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "logit_bias": request.logit_bias,
        "logprobs": request.logprobs,
        "top_logprobs": request.top_logprobs,
        "extra": request.extra or None,
    }


def cache_key(request: ChatRequest, model_group: str | None = None, *, namespace: str | None = None) -> str:
    """The cache key of a chat request: ``[namespace:]chat:<sha256 hex>``.

    Args:
        request: the decoded chat request.
        model_group: the resolved model group name.
        namespace: an optional keyspace (the API key id when the cache is per key).
    """
    digest = hashlib.sha256(_encoder.encode(canonical_request(request, model_group))).hexdigest()
    key = f"chat:{digest}"
    if namespace is not None:
        # Hash the namespace too: API key ids must not leak into Redis key names.
        ns = hashlib.sha256(namespace.encode()).hexdigest()[:16]
        key = f"ns:{ns}:{key}"
    return key
