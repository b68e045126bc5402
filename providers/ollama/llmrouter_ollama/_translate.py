"""Translation between the OpenAI wire types and Ollama's ``/api/chat`` and ``/api/generate``.

Pure functions and one small stateful stream translator; no I/O here, so the mapping
can be read (and tested) apart from the HTTP calls.

Request mapping (OpenAI -> Ollama ``options``): ``temperature``, ``top_p``, ``seed``,
``stop``, ``presence_penalty``, ``frequency_penalty`` by name; ``max_completion_tokens``
/ ``max_tokens`` -> ``num_predict``. ``response_format`` -> ``format`` (``"json"`` or the
JSON schema). Ollama-only fields sent by a client (``keep_alive``, ``think``, ``options``,
``top_k``, ``min_p``, ``repeat_penalty``, ``num_ctx``...) are passed through;
``reasoning_effort`` / ``reasoning.effort`` become ``think`` as in Ollama's own OpenAI layer.

Response mapping: ``done_reason`` -> ``finish_reason`` (``length`` stays, anything else
is ``stop``, and ``tool_calls`` when the model called a tool); ``prompt_eval_count`` /
``eval_count`` -> usage (counted, and marked estimated, when Ollama leaves them out, as
it does for a fully cached prompt).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from typing import Any, Literal

from llmrouter.errors import InvalidRequestError, UnsupportedFeatureError
from llmrouter.provider import refuse_audio_output
from llmrouter.tokens import count_messages, count_text
from llmrouter.types import (
    AudioPart,
    ChatChoice,
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ChunkChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Delta,
    FilePart,
    FunctionCall,
    FunctionCallDelta,
    ImagePart,
    TextPart,
    ToolCall,
    ToolCallDelta,
    Usage,
    new_id,
    now,
)

__all__ = [
    "ChatStreamTranslator",
    "build_chat_body",
    "build_generate_body",
    "completion_chunk",
    "completion_response",
    "convert_messages",
    "finish_reason_for",
    "to_chat_response",
]

PROVIDER = "ollama"

# Request fields a client may add for Ollama; they go into ``options``.
_PASSTHROUGH_OPTIONS = frozenset(
    {
        "top_k",
        "min_p",
        "typical_p",
        "repeat_penalty",
        "repeat_last_n",
        "num_ctx",
        "num_keep",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "penalize_newline",
        "num_batch",
        "num_gpu",
        "num_thread",
    }
)
# Request fields a client may add for Ollama; they go at the top level of the body.
_PASSTHROUGH_TOP = frozenset({"keep_alive", "think"})
# OpenAI's reasoning effort -> Ollama's think, as Ollama's /v1 endpoints map it.
_THINK_FOR_EFFORT: dict[str, str | bool] = {"high": "high", "medium": "medium", "low": "low", "none": False}


# --- requests ---------------------------------------------------------------------------


def _sampling_options(request: ChatRequest | CompletionRequest, defaults: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = dict(defaults)
    extra = request.extra
    client_options = extra.get("options")
    if isinstance(client_options, dict):
        options.update(client_options)
    options.update({key: value for key, value in extra.items() if key in _PASSTHROUGH_OPTIONS})
    named = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "num_predict": request.output_limit,
    }
    options.update({key: value for key, value in named.items() if value is not None})
    if request.stop_list:
        options["stop"] = request.stop_list
    return options


def _reject_unsupported(request: ChatRequest | CompletionRequest) -> None:
    if request.n not in (None, 1):
        raise UnsupportedFeatureError(
            "ollama returns one choice per request: n must be 1", param="n", provider=PROVIDER
        )
    if request.logit_bias:
        raise UnsupportedFeatureError(
            "ollama does not support logit_bias", param="logit_bias", provider=PROVIDER
        )


def _reasoning_effort(request: ChatRequest | CompletionRequest) -> tuple[Any, str] | None:
    """The effort a client asked for and the field it came in (``reasoning`` first, as
    Ollama reads them), or None."""
    reasoning = request.extra.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        return reasoning["effort"], "reasoning.effort"
    effort = request.extra.get("reasoning_effort")
    if effort is not None:
        return effort, "reasoning_effort"
    return None


def _top_level(request: ChatRequest | CompletionRequest, keep_alive: str | float | None) -> dict[str, Any]:
    """``keep_alive`` and ``think`` at the top of a chat or generate body: the request's
    ``keep_alive`` wins over the deployment's, Ollama's own ``think`` over an OpenAI
    reasoning effort."""
    fields: dict[str, Any] = {} if keep_alive is None else {"keep_alive": keep_alive}
    fields.update({key: value for key, value in request.extra.items() if key in _PASSTHROUGH_TOP})
    _check_top_level(fields)
    asked = _reasoning_effort(request)
    if "think" not in fields and asked is not None:
        effort, param = asked
        if not isinstance(effort, str) or effort not in _THINK_FOR_EFFORT:
            raise InvalidRequestError(
                f'invalid reasoning effort {effort!r}: ollama takes "high", "medium", "low" or "none"',
                param=param,
            )
        fields["think"] = _THINK_FOR_EFFORT[effort]
    return fields


def _check_top_level(fields: dict[str, Any]) -> None:
    """The types Ollama takes for ``keep_alive`` (a duration: text or seconds) and
    ``think`` (true/false, or a level): the client library checks them before sending a
    completion, and its error would read as a broken daemon and cool the deployment."""
    keep_alive, think = fields.get("keep_alive"), fields.get("think")
    if keep_alive is not None and (
        isinstance(keep_alive, bool) or not isinstance(keep_alive, str | int | float)
    ):
        raise InvalidRequestError(
            'keep_alive must be a duration ("5m", "1h") or a number of seconds', param="keep_alive"
        )
    if think is not None and not isinstance(think, bool | str):
        raise InvalidRequestError(
            'think must be true, false or a level ("high", "medium", "low")', param="think"
        )


def _image_bytes(part: ImagePart, where: str) -> bytes:
    url = part.image_url.url
    if not url.startswith("data:"):
        # Fetching a client-given URL from here would let clients make the router call
        # arbitrary hosts; Ollama itself only takes inline images.
        raise UnsupportedFeatureError(
            "ollama takes inline images only: send the image as a data: URL (base64)",
            param=where,
            provider=PROVIDER,
        )
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise InvalidRequestError("image data URL must be base64-encoded", param=where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"image data URL is not valid base64: {exc}", param=where) from exc


def _content_and_images(message: ChatMessage, where: str) -> tuple[str, list[str]]:
    content = message.content
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ImagePart):
            images.append(base64.b64encode(_image_bytes(part, f"{where}.content[{j}]")).decode())
        elif isinstance(part, AudioPart | FilePart):
            raise UnsupportedFeatureError(
                f"ollama does not accept {part.__struct_config__.tag} content parts",
                param=f"{where}.content[{j}]",
                provider=PROVIDER,
            )
    return "\n".join(texts), images


def _tool_call_to_ollama(call: ToolCall, where: str) -> dict[str, Any]:
    if call.type == "custom":
        # Its .function is an empty placeholder: it would be a call of a nameless function.
        raise UnsupportedFeatureError(
            "ollama has no custom (free-form) tools: a custom tool call cannot be sent",
            param=where,
            provider=PROVIDER,
        )
    try:
        arguments = json.loads(call.function.arguments) if call.function.arguments else {}
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"tool call arguments are not valid JSON: {exc}", param=f"{where}.function.arguments"
        ) from exc
    if not isinstance(arguments, dict):
        raise InvalidRequestError(
            "tool call arguments must be a JSON object", param=f"{where}.function.arguments"
        )
    return {"function": {"name": call.function.name, "arguments": arguments}}


def convert_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> Ollama messages (images inline, tool results named by their tool)."""
    tool_names: dict[str, str] = {}
    converted: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        content, images = _content_and_images(message, where)
        role = "system" if message.role == "developer" else message.role
        item: dict[str, Any] = {"role": role, "content": content}
        if images:
            item["images"] = images
        if message.role == "assistant":
            if message.tool_calls:
                item["tool_calls"] = [
                    _tool_call_to_ollama(call, f"{where}.tool_calls[{k}]")
                    for k, call in enumerate(message.tool_calls)
                ]
                tool_names.update({call.id: call.function.name for call in message.tool_calls})
            thinking = message.reasoning_content or message.reasoning  # either spelling
            if thinking:
                item["thinking"] = thinking
        elif message.role in ("tool", "function"):
            # Ollama names a tool result by the tool, OpenAI by the call id.
            item["role"] = "tool"
            name = message.name or tool_names.get(message.tool_call_id or "")
            if name:
                item["tool_name"] = name
        converted.append(item)
    return converted


def _convert_tools(request: ChatRequest) -> list[dict[str, Any]] | None:
    if not request.tools or request.tool_choice == "none":
        return None
    if request.tool_choice == "required":
        # Ollama has no way to force a call: passed on as "auto", the model may answer in text.
        raise UnsupportedFeatureError(
            'ollama cannot force a tool call: tool_choice "required" is not supported '
            '(use "auto", "none" or {"type": "function", "function": {"name": ...}})',
            param="tool_choice",
            provider=PROVIDER,
        )
    tools = request.tools
    for index, tool in enumerate(tools):
        if tool.type == "custom":
            # Its .function is an empty placeholder: it would be a nameless function.
            raise UnsupportedFeatureError(
                "ollama has no custom (free-form) tools: offer function tools only",
                param=f"tools[{index}]",
                provider=PROVIDER,
            )
    choice = request.tool_choice
    if isinstance(choice, dict):
        # Ollama has no tool_choice: offering only the chosen function is the closest.
        wanted = (choice.get("function") or {}).get("name")
        tools = [tool for tool in tools if tool.function.name == wanted]
        if not tools:
            raise InvalidRequestError(f"tool_choice names unknown function {wanted!r}", param="tool_choice")
    result = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description is not None:
            function["description"] = tool.function.description
        function["parameters"] = tool.function.parameters or {"type": "object", "properties": {}}
        result.append({"type": "function", "function": function})
    return result


def _response_format(request: ChatRequest) -> str | dict[str, Any] | None:
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return "json"
    if fmt.json_schema is None or fmt.json_schema.schema is None:
        raise InvalidRequestError(
            "response_format json_schema needs a schema", param="response_format.json_schema"
        )
    return fmt.json_schema.schema


def build_chat_body(
    request: ChatRequest,
    model: str,
    *,
    stream: bool,
    default_options: dict[str, Any],
    keep_alive: str | float | None,
) -> dict[str, Any]:
    """The JSON body of ``POST /api/chat`` for ``request``."""
    _reject_unsupported(request)
    refuse_audio_output(request, PROVIDER)
    body: dict[str, Any] = {"model": model, "messages": convert_messages(request.messages), "stream": stream}
    tools = _convert_tools(request)
    if tools:
        body["tools"] = tools
    fmt = _response_format(request)
    if fmt is not None:
        body["format"] = fmt
    options = _sampling_options(request, default_options)
    if options:
        body["options"] = options
    if request.logprobs:
        body["logprobs"] = True
        if request.top_logprobs:
            body["top_logprobs"] = request.top_logprobs
    body.update(_top_level(request, keep_alive))
    return body


def build_generate_body(
    request: CompletionRequest, model: str, *, default_options: dict[str, Any], keep_alive: str | float | None
) -> dict[str, Any]:
    """Keyword arguments of ``AsyncClient.generate`` for a legacy (raw prompt) completion."""
    _reject_unsupported(request)
    if request.echo:
        raise UnsupportedFeatureError("ollama cannot echo the prompt", param="echo", provider=PROVIDER)
    # A legacy completion continues the prompt as given: no chat template (raw mode).
    body: dict[str, Any] = {"model": model, "prompt": request.prompt_text, "raw": True}
    if request.suffix is not None:
        body["suffix"] = request.suffix
        body["raw"] = False  # Ollama fills a suffix through the model's template only
    options = _sampling_options(request, default_options)
    if options:
        body["options"] = options
    if request.logprobs is not None:
        # Legacy ``logprobs: k`` asks for the chosen tokens' logprobs and k alternatives.
        body["logprobs"] = True
        if request.logprobs:
            body["top_logprobs"] = request.logprobs
    body.update(_top_level(request, keep_alive))
    return body


# --- responses --------------------------------------------------------------------------


def finish_reason_for(done_reason: str | None, *, called_tools: bool) -> str:
    if called_tools:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def _usage(part: Any, *, prompt_tokens_fallback: int, completion_text: str, model: str) -> Usage:
    prompt = part.prompt_eval_count
    completion = part.eval_count
    estimated = prompt is None or completion is None
    if prompt is None:
        prompt = prompt_tokens_fallback
    if completion is None:
        completion = count_text(completion_text, model)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        estimated=estimated,
    )


def _tool_calls(message: Any) -> list[ToolCall]:
    return [
        ToolCall(
            id=f"call_{uuid.uuid4().hex[:24]}",
            function=FunctionCall(
                name=call.function.name, arguments=json.dumps(dict(call.function.arguments))
            ),
        )
        for call in message.tool_calls or ()
    ]


def _token_logprob(entry: Any) -> dict[str, Any]:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token.encode("utf-8"))}


def _logprobs(part: Any) -> dict[str, Any] | None:
    """Ollama's logprobs as OpenAI's ``logprobs.content``, whose entries must all carry
    ``bytes`` and ``top_logprobs`` (the OpenAI SDK rejects a chat completion without)."""
    entries = getattr(part, "logprobs", None)
    if not entries:
        return None
    return {
        "content": [
            {
                **_token_logprob(entry),
                "top_logprobs": [_token_logprob(top) for top in entry.top_logprobs or ()],
            }
            for entry in entries
        ]
    }


def _legacy_logprobs(part: Any, text_offset: int) -> dict[str, Any] | None:
    """Ollama's logprobs in the legacy completion shape; offsets count from ``text_offset``
    (the text sent before this part) and, as OpenAI says, each ``top_logprobs`` dict
    holds the chosen token too."""
    entries = getattr(part, "logprobs", None)
    if not entries:
        return None
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [
            {**{top.token: top.logprob for top in entry.top_logprobs or ()}, entry.token: entry.logprob}
            for entry in entries
        ],
        "text_offset": offsets,
    }


def to_chat_response(part: Any, request: ChatRequest) -> ChatResponse:
    """An Ollama ``ChatResponse`` (``stream: false``) -> an OpenAI chat completion."""
    message = part.message
    tool_calls = _tool_calls(message)
    content = message.content or ""
    out = ChatMessage(
        role="assistant",
        content=content if content or not tool_calls else None,
        tool_calls=tool_calls or None,
        reasoning_content=message.thinking or None,
    )
    return ChatResponse(
        id=new_id(),
        created=now(),
        model=part.model or request.model,
        choices=[
            ChatChoice(
                message=out,
                finish_reason=finish_reason_for(part.done_reason, called_tools=bool(tool_calls)),
                logprobs=_logprobs(part),
            )
        ],
        usage=_usage(
            part,
            prompt_tokens_fallback=count_messages(request.messages, request.model),
            completion_text=content,
            model=request.model,
        ),
    )


class ChatStreamTranslator:
    """Turns Ollama's NDJSON chat parts into OpenAI chunks, one stream at a time.

    The first content chunk carries ``role``; tool calls get indexes in order; the
    ``done`` part becomes a finish chunk followed by a usage chunk with no choices
    (the router strips the latter when the client did not ask for usage).
    """

    def __init__(self, request: ChatRequest) -> None:
        self.request = request
        self.id = new_id()
        self.created = now()
        self.model = request.model
        self.done = False
        self._role_sent = False
        self._tool_index = 0
        self._text: list[str] = []

    def _chunk(
        self, delta: Delta | None, finish_reason: str | None = None, logprobs: Any = None
    ) -> ChatChunk:
        choices = (
            []
            if delta is None
            else [ChunkChoice(delta=delta, finish_reason=finish_reason, logprobs=logprobs)]
        )
        return ChatChunk(id=self.id, created=self.created, model=self.model, choices=choices)

    def _role(self) -> Literal["assistant"] | None:
        if self._role_sent:
            return None
        self._role_sent = True
        return "assistant"

    def translate(self, part: Any) -> list[ChatChunk]:
        """The OpenAI chunks for one Ollama stream part."""
        self.model = part.model or self.model
        chunks: list[ChatChunk] = []
        message = part.message
        content = message.content or ""
        if content or message.thinking:
            self._text.append(content)
            delta = Delta(
                role=self._role(), content=content or None, reasoning_content=message.thinking or None
            )
            chunks.append(self._chunk(delta, logprobs=_logprobs(part)))
        calls = _tool_calls(message)
        if calls:
            deltas = []
            for call in calls:
                deltas.append(
                    ToolCallDelta(
                        index=self._tool_index,
                        id=call.id,
                        type="function",
                        function=FunctionCallDelta(
                            name=call.function.name, arguments=call.function.arguments
                        ),
                    )
                )
                self._tool_index += 1
            chunks.append(self._chunk(Delta(role=self._role(), tool_calls=deltas)))
        if part.done:
            self.done = True
            reason = finish_reason_for(part.done_reason, called_tools=self._tool_index > 0)
            chunks.append(self._chunk(Delta(), finish_reason=reason))
            usage_chunk = self._chunk(None)
            usage_chunk.usage = _usage(
                part,
                prompt_tokens_fallback=count_messages(self.request.messages, self.request.model),
                completion_text="".join(self._text),
                model=self.request.model,
            )
            chunks.append(usage_chunk)
        return chunks


def completion_response(part: Any, request: CompletionRequest) -> CompletionResponse:
    """An Ollama ``GenerateResponse`` -> an OpenAI legacy completion."""
    text = part.response or ""
    return CompletionResponse(
        id=new_id("cmpl"),
        created=now(),
        model=part.model or request.model,
        choices=[
            CompletionChoice(
                text=text,
                finish_reason=finish_reason_for(part.done_reason, called_tools=False),
                logprobs=_legacy_logprobs(part, 0),
            )
        ],
        usage=_usage(
            part,
            prompt_tokens_fallback=count_text(request.prompt_text, request.model),
            completion_text=text,
            model=request.model,
        ),
    )


def completion_chunk(
    part: Any, request: CompletionRequest, stream_id: str, created: int, text_so_far: str
) -> list[CompletionChunk]:
    """The legacy-completion chunks for one ``/api/generate`` stream part."""
    chunks: list[CompletionChunk] = []
    model = part.model or request.model
    if part.response:
        choice = CompletionChoice(text=part.response, logprobs=_legacy_logprobs(part, len(text_so_far)))
        chunks.append(CompletionChunk(id=stream_id, created=created, model=model, choices=[choice]))
    if part.done:
        reason = finish_reason_for(part.done_reason, called_tools=False)
        chunks.append(
            CompletionChunk(
                id=stream_id, created=created, model=model, choices=[CompletionChoice(finish_reason=reason)]
            )
        )
        usage = _usage(
            part,
            prompt_tokens_fallback=count_text(request.prompt_text, request.model),
            completion_text=text_so_far + (part.response or ""),
            model=request.model,
        )
        chunks.append(CompletionChunk(id=stream_id, created=created, model=model, choices=[], usage=usage))
    return chunks
