"""Translation between OpenAI wire types and what vLLM takes and gives (no vLLM import).

vLLM's outputs are read by attribute (``RequestOutput``, ``CompletionOutput``,
``Logprob``) so this module stays importable without vLLM and testable on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llmrouter.errors import (
    ContextWindowExceededError,
    InvalidRequestError,
    UnsupportedFeatureError,
    UpstreamError,
)
from llmrouter.provider import refuse_tool_calling
from llmrouter.types import (
    ChatMessage,
    ChatRequest,
    PromptTokensDetails,
    ResponseFormat,
    TextPart,
    ToolCall,
    Usage,
)

PROVIDER = "vllm"

# vLLM finish reasons -> OpenAI's. "abort" is handled apart: a request the client
# cancelled has no one left to tell, and one the engine aborted by itself is an error.
_FINISH_REASONS = {"stop": "stop", "length": "length", "repetition": "stop"}


def template_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The request's messages as the plain dicts a Hugging Face chat template expects.

    Raises:
        UnsupportedFeatureError: a message carries images, audio or files (text-only
            models), or a custom tool call.
    """
    messages: list[dict[str, Any]] = []
    for index, message in enumerate(request.messages):
        messages.append(_template_message(message, index))
    return messages


def _template_message(message: ChatMessage, index: int) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list) and not all(isinstance(part, TextPart) for part in content):
        raise UnsupportedFeatureError(
            "this vllm deployment takes text content only",
            param=f"messages[{index}].content",
            provider=PROVIDER,
        )
    text = content if isinstance(content, str) or content is None else "".join(p.text for p in content)  # type: ignore[union-attr]
    # Most chat templates know "system" but not OpenAI's newer "developer" role.
    role = "system" if message.role == "developer" else message.role
    entry: dict[str, Any] = {"role": role, "content": text or ""}
    if message.name is not None:
        entry["name"] = message.name
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        entry["tool_calls"] = [_template_call(call, index, k) for k, call in enumerate(message.tool_calls)]
    return entry


def _template_call(call: ToolCall, index: int, k: int) -> dict[str, Any]:
    if call.type == "custom":
        # Its .function is an empty placeholder: the template would show a nameless call.
        raise UnsupportedFeatureError(
            "custom (free-form) tool calls are not supported by the vllm provider",
            param=f"messages[{index}].tool_calls[{k}]",
            provider=PROVIDER,
        )
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": call.function.arguments},
    }


def check_chat_features(request: ChatRequest) -> None:
    """Reject what this provider cannot honour instead of silently ignoring it: tool
    calling (see :func:`llmrouter.provider.refuse_tool_calling`)."""
    refuse_tool_calling(request, PROVIDER)


def structured_outputs(
    response_format: ResponseFormat | None, extra: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The keywords of vLLM's ``StructuredOutputsParams`` for a request; None when unconstrained.

    The constraint comes from OpenAI's ``response_format``, or from the fields clients of
    a vLLM server send beside OpenAI's: its ``structured_outputs`` object and its older
    ``guided_*`` fields. Dropped, these would get a 200 of free text where the client
    parses JSON or expects one of its choices.

    Raises:
        InvalidRequestError: more than one constraint, vLLM's fields with none, or a
            ``structured_outputs`` that is not an object.
        UnsupportedFeatureError: a ``guided_*`` field with no counterpart here (the
            per-request ``guided_decoding_backend``: the engine's backend is fixed at start).
    """
    sources = _response_format_source(response_format) + _vllm_sources(extra)
    constraints = [
        (param, keyword)
        for param, keywords in sources
        for keyword, value in keywords.items()
        if keyword in _CONSTRAINTS and value is not None
    ]
    if len(constraints) > 1:
        named = " and ".join(f"{param} ({keyword})" for param, keyword in constraints)
        raise InvalidRequestError(
            f"one output constraint per request, not {named}", param=constraints[1][0], provider=PROVIDER
        )
    if sources and not constraints:
        raise InvalidRequestError(
            f"{sources[0][0]} sets no output constraint (one of {', '.join(_CONSTRAINTS)})",
            param=sources[0][0],
            provider=PROVIDER,
        )
    merged: dict[str, Any] = {}
    for _, keywords in sources:
        merged.update(keywords)
    return merged or None


# vLLM's older request fields for structured output, by the StructuredOutputsParams
# keyword each one became (vLLM's own server forwarded them so).
_GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "guided_whitespace_pattern": "whitespace_pattern",
}

# The StructuredOutputsParams keywords that constrain the output; vLLM takes one at most.
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _response_format_source(response_format: ResponseFormat | None) -> list[tuple[str, dict[str, Any]]]:
    if response_format is None or response_format.type == "text":
        return []
    if response_format.type == "json_object":
        return [("response_format", {"json_object": True})]
    schema = response_format.json_schema.schema if response_format.json_schema else None
    if schema is None:
        raise InvalidRequestError(
            "response_format json_schema needs a schema", param="response_format", provider=PROVIDER
        )
    return [("response_format", {"json": schema})]


def _vllm_sources(extra: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """vLLM's own structured-output fields among the request's extra fields."""
    sources: list[tuple[str, dict[str, Any]]] = []
    native = extra.get("structured_outputs")
    if native is not None:
        if not isinstance(native, dict):
            raise InvalidRequestError(
                "structured_outputs must be an object", param="structured_outputs", provider=PROVIDER
            )
        sources.append(("structured_outputs", dict(native)))
    for field, value in extra.items():
        if not field.startswith("guided_") or value is None:
            continue
        keyword = _GUIDED_FIELDS.get(field)
        if keyword is None:
            raise UnsupportedFeatureError(
                f"`{field}` is not supported by the vllm provider", param=field, provider=PROVIDER
            )
        sources.append((field, {keyword: value}))
    return sources


def chat_logprobs_count(request: ChatRequest) -> int | None:
    """vLLM's ``logprobs`` (number of top alternatives) for a chat request, None when off."""
    if not request.logprobs:
        if request.top_logprobs:
            raise InvalidRequestError(
                "top_logprobs needs logprobs=true", param="top_logprobs", provider=PROVIDER
            )
        return None
    return request.top_logprobs or 0


def output_limit(requested: int | None, prompt_len: int, max_model_len: int, *, param: str) -> int:
    """The ``max_tokens`` to ask vLLM for: the request's, else what the context leaves.

    Args:
        param: the request field that holds the prompt (``messages`` or ``prompt``),
            named by the error.

    Raises:
        ContextWindowExceededError: the prompt (plus the requested tokens) does not fit.
    """
    room = max_model_len - prompt_len
    if room <= 0 or (requested is not None and requested > room):
        asked = f" + {requested} output tokens" if requested is not None else ""
        raise ContextWindowExceededError(
            f"this model's context is {max_model_len} tokens; the prompt has {prompt_len}{asked}",
            param=param,
            provider=PROVIDER,
        )
    return requested if requested is not None else room


def finish_reason(vllm_reason: str | None, *, request_id: str) -> str | None:
    """OpenAI's finish_reason for vLLM's; an engine-side abort or error becomes an exception."""
    if vllm_reason is None:
        return None
    mapped = _FINISH_REASONS.get(vllm_reason)
    if mapped is not None:
        return mapped
    raise UpstreamError(
        f"vllm ended request {request_id} with finish_reason={vllm_reason!r}",
        provider=PROVIDER,
    )


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> Usage:
    """Usage counted from the engine's own token ids (exact, so never ``estimated``)."""
    details = PromptTokensDetails(cached_tokens=cached_tokens) if cached_tokens else None
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=details,
    )


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": max(logprob, -9999.0), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[Mapping[int, Any]] | None,
    top: int,
    decode: Any,
) -> dict[str, Any] | None:
    """OpenAI chat ``logprobs`` (``{"content": [...]}``) from vLLM's per-position maps.

    Args:
        token_ids: the generated token ids of this piece.
        logprobs: vLLM's per-position ``{token_id: Logprob}`` maps (same length).
        top: how many alternatives the client asked for (``top_logprobs``).
        decode: turns one token id into its text when vLLM did not decode it.
    """
    if logprobs is None:
        return None
    content = []
    for token_id, position in zip(token_ids, logprobs, strict=False):
        chosen = position.get(token_id)
        text = _decoded(chosen, token_id, decode)
        entry = _token_entry(text, chosen.logprob if chosen is not None else float("-inf"))
        ranked = sorted(position.items(), key=lambda item: item[1].rank or 0)
        entry["top_logprobs"] = [
            _token_entry(_decoded(lp, tid, decode), lp.logprob) for tid, lp in ranked[:top]
        ]
        content.append(entry)
    return {"content": content}


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[Mapping[int, Any]] | None,
    top: int,
    decode: Any,
    text_offset: int,
) -> dict[str, Any] | None:
    """Legacy ``/v1/completions`` logprobs (tokens, token_logprobs, top_logprobs, text_offset)."""
    if logprobs is None:
        return None
    tokens: list[str] = []
    token_logprobs: list[float] = []
    tops: list[dict[str, float]] = []
    offsets: list[int] = []
    for token_id, position in zip(token_ids, logprobs, strict=False):
        chosen = position.get(token_id)
        text = _decoded(chosen, token_id, decode)
        tokens.append(text)
        token_logprobs.append(chosen.logprob if chosen is not None else float("-inf"))
        ranked = sorted(position.items(), key=lambda item: item[1].rank or 0)[:top]
        tops.append({_decoded(lp, tid, decode): lp.logprob for tid, lp in ranked})
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _decoded(logprob: Any, token_id: int, decode: Any) -> str:
    text = getattr(logprob, "decoded_token", None) if logprob is not None else None
    return text if text is not None else decode(token_id)
