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

__all__ = ["KEY_VERSION", "CanonicalRequest", "cache_key", "canonical_request"]

KEY_VERSION = 3
"""Bumped when the canonical form changes, so old entries are simply never found
(2: encoded as a JSON array, in the field order of :class:`CanonicalRequest`; 3: a tool
call's ``arguments`` always written, ``""`` included, and the fields of messages, tool
calls and tools modeled since: ``function_call``, ``audio``, ``prefix``, custom tools and
calls, ``extra_content``, a tool's ``cache_control``)."""

# Sorted keys make dicts (tool schemas, logit_bias, extra fields) order-independent.
_encoder = msgspec.json.Encoder(order="sorted")


class CanonicalRequest(msgspec.Struct, array_like=True, frozen=True):
    """The answer-changing part of a chat request. Encoded as an array: no field names
    to write and none to sort (a third of the cost of the same data as a sorted dict)."""

    v: int
    op: str
    model: str
    messages: Any
    tools: Any
    tool_choice: Any
    parallel_tool_calls: Any
    response_format: Any
    temperature: Any
    top_p: Any
    output_limit: Any
    """``max_tokens`` and ``max_completion_tokens`` mean the same limit for the answer."""
    n: Any
    stop: Any
    seed: Any
    presence_penalty: Any
    frequency_penalty: Any
    logit_bias: Any
    logprobs: Any
    top_logprobs: Any
    extra: Any


def canonical_request(request: ChatRequest, model_group: str | None = None) -> CanonicalRequest:
    """The answer-changing part of a chat request.

    Args:
        request: the decoded chat request.
        model_group: the resolved model group (aliases of one group share entries);
            defaults to the requested model name.
    """
    # The sampling numbers as floats: a library caller's ``temperature=0`` keys as the
    # ``0.0`` an HTTP body decodes to (msgspec decodes these float fields as floats, ints
    # included), so this changes no HTTP request's key and KEY_VERSION stays. Inline, not
    # a helper, and float() only for what is not a float already: this runs for every
    # cacheable request.
    temperature, top_p = request.temperature, request.top_p
    presence, frequency = request.presence_penalty, request.frequency_penalty
    return CanonicalRequest(
        KEY_VERSION,
        "chat",
        model_group or request.model,
        request.messages,
        request.tools,
        request.tool_choice,
        request.parallel_tool_calls,
        request.response_format,
        temperature if temperature is None or type(temperature) is float else float(temperature),
        top_p if top_p is None or type(top_p) is float else float(top_p),
        request.output_limit,
        request.n if request.n != 1 else None,
        request.stop_list or None,
        request.seed,
        presence if presence is None or type(presence) is float else float(presence),
        frequency if frequency is None or type(frequency) is float else float(frequency),
        request.logit_bias,
        request.logprobs,
        request.top_logprobs,
        request.extra or None,
    )


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
