"""Turning requests into prompt token ids and sampling settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmrouter.errors import ContextWindowExceededError, InvalidRequestError, UnsupportedFeatureError
from llmrouter.provider import check_token_ids, refuse_tool_calling
from llmrouter.types import ChatMessage, ChatRequest, CompletionRequest, TextPart, message_text
from llmrouter_transformers.sampling import SamplingParams

__all__ = ["SamplingDefaults", "chat_prompt_ids", "completion_prompt_ids", "load_template", "sampling_params"]

_PROVIDER = "transformers"


def load_template(value: str | None) -> str | None:
    """A configured chat template: Jinja text, or the path of a ``.jinja`` file."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    return value


def _message_dict(message: ChatMessage, index: int) -> dict[str, Any]:
    if isinstance(message.content, list) and any(not isinstance(p, TextPart) for p in message.content):
        raise UnsupportedFeatureError(
            "this model takes text only (no images, audio or files)",
            param=f"messages[{index}].content",
            provider=_PROVIDER,
        )
    # Most chat templates know no "developer" role: it is OpenAI's new name for "system".
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": message_text(message)}


def chat_prompt_ids(tokenizer: Any, request: ChatRequest, *, template: str | None, model: str) -> list[int]:
    """Render the messages with the chat template and tokenize them.

    Raises:
        UnsupportedFeatureError: the model has no chat template and none is configured,
            or the request asks for what a local model cannot do (tools or functions,
            images, JSON output).
        InvalidRequestError: the template rejected the conversation.
    """
    refuse_tool_calling(request, _PROVIDER)
    if request.response_format is not None and request.response_format.type != "text":
        # Nothing here would hold the answer to JSON: refuse rather than let the client
        # parse free text (a deployment that can, vLLM or Ollama, takes it instead).
        raise UnsupportedFeatureError(
            f"response_format {request.response_format.type} is not supported by the transformers provider",
            param="response_format",
            provider=_PROVIDER,
        )
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise UnsupportedFeatureError(
            f"model {model!r} has no chat template: set the deployment option `chat_template` "
            "(Jinja text or a .jinja file) or use /v1/completions",
            param="messages",
            provider=_PROVIDER,
        )
    messages = [_message_dict(m, i) for i, m in enumerate(request.messages)]
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except TemplateError as exc:
        raise InvalidRequestError(
            f"the chat template rejected the messages: {exc}", param="messages", provider=_PROVIDER
        ) from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def completion_prompt_ids(tokenizer: Any, request: CompletionRequest) -> list[int]:
    """Token ids of a legacy completion prompt (text, or token ids as given)."""
    for name in ("echo", "suffix"):
        if getattr(request, name):
            raise UnsupportedFeatureError(
                f"`{name}` is not supported by the transformers provider", param=name, provider=_PROVIDER
            )
    if request.best_of is not None and request.best_of > 1:
        raise UnsupportedFeatureError("`best_of` > 1 is not supported", param="best_of", provider=_PROVIDER)
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        return list(prompt[0])
    return list(tokenizer(request.prompt_text)["input_ids"])


class SamplingDefaults:
    """What a request that leaves a setting out gets.

    Args:
        generation_config: the model's ``GenerationConfig``; a model that does not
            sample by default (``do_sample`` false) decodes greedily.
        temperature: a deployment-wide default that wins over the model's.
        max_context: longest prompt + answer the model takes.
    """

    def __init__(self, generation_config: Any, *, temperature: float | None, max_context: int | None) -> None:
        samples = bool(getattr(generation_config, "do_sample", False))
        model_temperature = getattr(generation_config, "temperature", None) if samples else 0.0
        self.temperature = temperature if temperature is not None else float(model_temperature or 0.0)
        self.top_p = float(getattr(generation_config, "top_p", None) or 1.0) if samples else 1.0
        self.max_context = max_context


def sampling_params(
    request: ChatRequest | CompletionRequest,
    prompt_length: int,
    defaults: SamplingDefaults,
    *,
    vocabulary: int,
) -> SamplingParams:
    """The request's sampling settings, with its output limit checked against the context.

    Raises:
        ContextWindowExceededError: the prompt (plus ``max_tokens``) does not fit.
        UnsupportedFeatureError: ``n`` > 1 or ``logprobs``.
        InvalidRequestError: a ``logit_bias`` key that is not one of the model's
            ``vocabulary`` token ids.
    """
    if request.n is not None and request.n > 1:
        raise UnsupportedFeatureError(
            "`n` > 1 is not supported by the transformers provider", param="n", provider=_PROVIDER
        )
    if request.logprobs is not None and request.logprobs is not False:  # a completion's 0 asks for them too
        raise UnsupportedFeatureError(
            "`logprobs` is not supported by the transformers provider", param="logprobs", provider=_PROVIDER
        )
    limit = request.output_limit
    room = None if defaults.max_context is None else defaults.max_context - prompt_length
    if room is not None and (room <= 0 or (limit is not None and limit > room)):
        raise ContextWindowExceededError(
            f"this model's context is {defaults.max_context} tokens; the prompt has {prompt_length}"
            + (f" and max_tokens asks for {limit}" if limit is not None else ""),
            param="messages" if isinstance(request, ChatRequest) else "prompt",
            provider=_PROVIDER,
        )
    bias: dict[int, float] = {}
    for key, value in (request.logit_bias or {}).items():
        try:
            bias[int(key)] = max(-100.0, min(100.0, float(value)))
        except ValueError as exc:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from exc
    check_token_ids(bias, vocabulary, param="logit_bias", provider=_PROVIDER)
    return SamplingParams(
        max_new_tokens=limit if limit is not None else (room if room is not None else 2048),
        temperature=request.temperature if request.temperature is not None else defaults.temperature,
        top_p=request.top_p if request.top_p is not None else defaults.top_p,
        seed=request.seed,
        stop=request.stop_list,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=bias,
    )
