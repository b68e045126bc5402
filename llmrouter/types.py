"""msgspec Structs for the OpenAI wire format.

One base class (:class:`Wire`) fixes the policy: keyword-only, defaults omitted
when encoding, unknown fields ignored when decoding. Clients are decoded
strictly (types, ranges, tagged content parts); upstream responses are decoded
with the same types, whose optional fields make them tolerant of what
OpenAI-compatible servers actually send.

Request fields llmrouter does not model are not lost: :func:`decode_chat_request`
keeps them in ``extra`` and :func:`request_to_wire` puts them back for upstreams. Inside
a message, a tool call or a tool only the modeled fields pass (the provider extensions
clients rely on among them: a tool call's ``extra_content``, a tool's ``cache_control``, a
message's ``prefix``); other keys there are dropped.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, UnsetType

from llmrouter.errors import InvalidRequestError, UnsupportedFeatureError
from llmrouter.ids import random_hex

__all__ = [
    "MOST_CHOICES",
    "MOST_TOKENS",
    "AssistantMessage",
    "AudioPart",
    "ChatChoice",
    "ChatChunk",
    "ChatMessage",
    "ChatRequest",
    "ChatResponse",
    "ChunkChoice",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionTokensDetails",
    "ContentPart",
    "CustomCall",
    "CustomCallDelta",
    "CustomToolDefinition",
    "Delta",
    "FilePart",
    "FunctionCall",
    "FunctionCallDelta",
    "FunctionDefinition",
    "ImagePart",
    "ImageURL",
    "JsonSchema",
    "ModelCard",
    "ModelList",
    "PromptTokensDetails",
    "RefusalPart",
    "ResponseFormat",
    "StreamOptions",
    "TextPart",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "Wire",
    "WireOut",
    "decode_chat_request",
    "decode_completion_request",
    "error_param",
    "invalid_request",
    "json_fault",
    "message_text",
    "new_id",
    "request_to_wire",
]


class Wire(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Base of request-side Structs: keyword-only, defaults left out when encoding."""


class WireOut(msgspec.Struct, kw_only=True):
    """Base of response-side objects: every field is encoded, as OpenAI does (``index: 0``,
    ``finish_reason: null``, ``object: "chat.completion"``), because clients rely on them."""


# --- content parts (tagged by "type") -------------------------------------------------


class TextPart(Wire, tag="text", tag_field="type"):
    text: str
    cache_control: dict[str, Any] | None = None
    """A prompt-caching breakpoint (``{"type": "ephemeral"}``), for Anthropic and Gemini
    models through OpenRouter."""


class ImageURL(Wire):
    url: str
    detail: str | None = None


class ImagePart(Wire, tag="image_url", tag_field="type"):
    image_url: ImageURL
    cache_control: dict[str, Any] | None = None


class InputAudio(Wire):
    data: str
    format: str


class AudioPart(Wire, tag="input_audio", tag_field="type"):
    input_audio: InputAudio


class FileRef(Wire):
    file_id: str | None = None
    file_data: str | None = None
    filename: str | None = None


class FilePart(Wire, tag="file", tag_field="type"):
    file: FileRef
    cache_control: dict[str, Any] | None = None


class RefusalPart(Wire, tag="refusal", tag_field="type"):
    """An assistant message's refusal, as a content part (sent back in a conversation)."""

    refusal: str


ContentPart = TextPart | ImagePart | AudioPart | FilePart | RefusalPart


# --- tools -----------------------------------------------------------------------------
#
# A tool and a tool call are of type "function" or "custom" (OpenAI's free-form tools).
# Code reads ``.function`` of either without a check: a custom one holds a placeholder
# there (name and arguments empty, frozen) that is never encoded. ``type`` is encoded
# always (a factory default is never left out by ``omit_defaults``), ``custom`` only when
# set.


def _function_type() -> Literal["function"]:
    return "function"


class FunctionDefinition(Wire):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _NoFunctionDefinition(FunctionDefinition, frozen=True):  # type: ignore[misc]
    """The ``function`` of a custom tool: a placeholder, never encoded."""

    def __reduce__(self) -> str:
        # Pickled and copied as the one instance: a copy would be encoded, and taken
        # for a function.
        return "_NO_FUNCTION_DEFINITION"


_NO_FUNCTION_DEFINITION = _NoFunctionDefinition(name="")


class CustomToolDefinition(Wire):
    """A custom tool: the model answers it with free text (``input``), not JSON."""

    name: str
    description: str | None = None
    format: dict[str, Any] | None = None
    """``{"type": "text"}`` or ``{"type": "grammar", "grammar": {...}}``."""


class Tool(Wire):
    function: FunctionDefinition = _NO_FUNCTION_DEFINITION
    custom: CustomToolDefinition | None = None
    type: Literal["function", "custom"] = msgspec.field(default_factory=_function_type)
    cache_control: dict[str, Any] | None = None
    """A prompt-caching breakpoint after the tools (Anthropic models through OpenRouter)."""


class FunctionCall(WireOut):
    """A call's function; ``arguments`` is always encoded (OpenAI requires the key, and
    servers answer a call without arguments with ``""``)."""

    name: str
    arguments: str = ""


class _NoFunctionCall(FunctionCall, frozen=True):  # type: ignore[misc]
    """The ``function`` of a custom tool call: a placeholder, never encoded."""

    def __reduce__(self) -> str:
        return "_NO_FUNCTION_CALL"


_NO_FUNCTION_CALL = _NoFunctionCall(name="")


class CustomCall(WireOut):
    name: str
    input: str = ""


class ToolCall(Wire):
    id: str
    function: FunctionCall = _NO_FUNCTION_CALL
    custom: CustomCall | None = None
    type: Literal["function", "custom"] = msgspec.field(default_factory=_function_type)
    extra_content: dict[str, Any] | None = None
    """Gemini's ``{"google": {"thought_signature": ...}}``: it answers a call with one, and
    a client must send it back with the call for the tool use to go on."""


class FunctionCallDelta(Wire):
    name: str | None = None
    arguments: str | None = None


class CustomCallDelta(Wire):
    name: str | None = None
    input: str | None = None


class ToolCallDelta(WireOut):
    index: int = 0
    id: str | None = None
    type: Literal["function", "custom"] | None = None
    function: FunctionCallDelta | None = None
    custom: CustomCallDelta | UnsetType | None = UNSET
    """A custom tool call's piece; left out of function calls' deltas (``null`` from an
    upstream is taken and relayed)."""
    extra_content: dict[str, Any] | UnsetType | None = UNSET
    """As in :class:`ToolCall`; left out when the upstream sent none."""


# --- messages --------------------------------------------------------------------------

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(Wire):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None
    """The call of an assistant message answering the deprecated ``functions`` (answered
    by a ``function`` message)."""
    audio: dict[str, Any] | None = None
    """An assistant's audio answer: ``{"id": ...}`` when a client refers back to it."""
    refusal: str | None = None
    reasoning_content: str | None = None
    """A reasoning model's thinking, as vLLM (before 0.10), DeepSeek and Ollama's native API name it."""
    reasoning: str | None = None
    """The same, as OpenRouter, Ollama's OpenAI API and newer vLLM name it. Each is
    relayed as the upstream sent it."""
    reasoning_details: list[dict[str, Any]] | None = None
    """OpenRouter's structured reasoning (some of it encrypted), which a client sends
    back in the assistant message of the next turn to keep the reasoning going."""
    annotations: list[dict[str, Any]] | None = None
    """Citations (``url_citation``) of answers with web search (OpenAI, OpenRouter)."""
    cache_control: dict[str, Any] | None = None
    """A prompt-caching breakpoint on the whole message (OpenRouter)."""
    prefix: bool | None = None
    """On the last (assistant) message: the answer continues its content (DeepSeek's and
    Mistral's prefill)."""


def _null() -> None:
    return None


class AssistantMessage(ChatMessage):
    """A choice's message in an answer: ``content`` and ``refusal`` are always written
    (``null`` when absent), as OpenAI writes them; clients test ``content === null``
    beside tool calls. A request's messages leave them out when unset.

    Their default is a factory, and ``omit_defaults`` leaves out only a value that *is*
    the field's default: ``None`` never is, so it is written (as :class:`Tool`'s
    ``type`` is)."""

    content: str | list[ContentPart] | None = msgspec.field(default_factory=_null)
    refusal: str | None = msgspec.field(default_factory=_null)


def message_text(message: ChatMessage) -> str:
    """The text of a message: its string content, or its text parts joined."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content if isinstance(part, TextPart))


# --- requests --------------------------------------------------------------------------


class _FieldError(ValueError):
    """A ``__post_init__`` check's failure that names its field (msgspec raises it as the
    ``__cause__`` of its ValidationError, where :func:`error_param` finds it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(Wire):
    include_usage: bool = False


class JsonSchema(Wire):
    name: str
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


Temperature = Annotated[float, Meta(ge=0, le=2)]
Probability = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
MOST_TOKENS = 2**31 - 1
"""The most tokens a request may ask for or a count may say (upstreams take int32, the
ledger's INTEGER columns hold no more); the router checks structs built in code against it."""
MOST_CHOICES = 128
"""The most answers (``n``) a request may ask for."""
# Integer fields are bounded: Python ints are unbounded, and a 400-digit max_tokens would
# overflow float arithmetic (the cost bound) downstream; upstreams take int32 / int64.
PositiveInt = Annotated[int, Meta(ge=1, le=MOST_TOKENS)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
Stop = str | Annotated[list[str], Meta(max_length=4)] | None
LogitBias = dict[Annotated[str, Meta(pattern=r"^-?[0-9]+\Z")], Annotated[float, Meta(ge=-100, le=100)]]
"""Token ids (as JSON keys, so strings) to a bias of -100 to 100, as OpenAI takes them (a
negative id is the vocabulary check's to refuse, by the deployment that has one)."""


class ChatRequest(Wire):
    """``POST /v1/chat/completions``."""

    model: Annotated[str, Meta(min_length=1)]
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    n: Annotated[int, Meta(ge=1, le=MOST_CHOICES)] | None = None
    stop: Stop = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    safety_identifier: str | None = None
    """OpenAI's successor of ``user`` for naming the caller's end user."""
    extra: dict[str, Any] = msgspec.field(default_factory=dict, name="__extra__")
    """Request fields llmrouter does not model; passed on to upstreams that take them."""

    @property
    def output_limit(self) -> int | None:
        """The most tokens the answer may have (``max_completion_tokens`` wins)."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def end_user(self) -> str | None:
        """Who the caller asks for: ``user``, else ``safety_identifier`` (ledger, budgets)."""
        return self.user or self.safety_identifier

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(Wire):
    """``POST /v1/completions`` (the legacy prompt API)."""

    model: Annotated[str, Meta(min_length=1)]
    prompt: str | list[Any]
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = 16
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: Annotated[int, Meta(ge=1, le=MOST_CHOICES)] | None = None
    stop: Stop = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool | None = None
    best_of: PositiveInt | None = None
    suffix: str | None = None
    user: str | None = None
    extra: dict[str, Any] = msgspec.field(default_factory=dict, name="__extra__")

    def __post_init__(self) -> None:
        # msgspec cannot express a union of several list types; check the list forms here.
        if isinstance(self.prompt, list) and self.prompt:
            first = self.prompt[0]
            if isinstance(first, list):
                kind_ok = all(isinstance(p, list) and all(type(t) is int for t in p) for p in self.prompt)
            else:
                kind = str if isinstance(first, str) else int
                kind_ok = all(type(p) is kind for p in self.prompt)
            if not kind_ok:
                raise _FieldError(
                    "prompt", "`prompt` must be a string, a list of strings or a list of token ids"
                )

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens

    @property
    def end_user(self) -> str | None:
        """Who the caller asks for (``user``)."""
        return self.user

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def prompt_count(self) -> int:
        """How many prompts the request holds (each gets its own ``n`` answers)."""
        if isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int):
            return 1
        return len(self.prompt)

    @property
    def prompt_text(self) -> str:
        """The prompt as one string (only for a single text prompt)."""
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) == 1 and isinstance(self.prompt[0], str):
            return self.prompt[0]
        # A deployment's limit, not the request's fault: another deployment may take it.
        raise UnsupportedFeatureError(
            "only a single text prompt is supported by this deployment", param="prompt"
        )


# --- usage -----------------------------------------------------------------------------


class PromptTokensDetails(WireOut):
    cached_tokens: int | None = None
    audio_tokens: int | None = None


class CompletionTokensDetails(WireOut):
    reasoning_tokens: int | None = None
    audio_tokens: int | None = None
    accepted_prediction_tokens: int | None = None
    rejected_prediction_tokens: int | None = None


class Usage(WireOut):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None
    cost: float | None = None
    """Cost in USD as reported by the provider (OpenRouter does); wins over our price table."""
    estimated: bool = False
    """True when the tokens were counted by llmrouter rather than reported by the provider."""

    @property
    def cached_tokens(self) -> int:
        details = self.prompt_tokens_details
        return (details.cached_tokens or 0) if details else 0


# --- responses -------------------------------------------------------------------------


class ChatChoice(WireOut):
    index: int = 0
    message: ChatMessage = msgspec.field(default_factory=lambda: AssistantMessage(role="assistant"))
    """An :class:`AssistantMessage` (a :class:`ChatMessage` given is made one)."""
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # Typed ChatMessage so that providers may build one, and upstreams' answers decode
        # to one; written as one, an answer would lose its null content and refusal.
        if type(self.message) is ChatMessage:
            self.message = _as_answer(self.message)


def _as_answer(m: ChatMessage) -> AssistantMessage:
    """``m`` as an answer's message. Each field by name: a third of the cost of
    ``AssistantMessage(**asdict(m))`` (0.2 against 0.7 µs, paid by every non-streamed
    answer); tests/core/test_types.py checks that none is left out."""
    return AssistantMessage(
        role=m.role,
        content=m.content,
        name=m.name,
        tool_calls=m.tool_calls,
        tool_call_id=m.tool_call_id,
        function_call=m.function_call,
        audio=m.audio,
        refusal=m.refusal,
        reasoning_content=m.reasoning_content,
        reasoning=m.reasoning,
        reasoning_details=m.reasoning_details,
        annotations=m.annotations,
        cache_control=m.cache_control,
        prefix=m.prefix,
    )


class ChatResponse(WireOut):
    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[ChatChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None
    service_tier: str | UnsetType | None = UNSET
    """The tier that served the answer (OpenAI's ``default``, ``flex``, ...); left out
    when the upstream sent none."""


class Delta(Wire):
    role: Role | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionCallDelta | None = None
    audio: dict[str, Any] | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    reasoning_details: list[dict[str, Any]] | None = None
    annotations: list[dict[str, Any]] | None = None
    """As in :class:`ChatMessage`, in pieces."""


class ChunkChoice(WireOut):
    index: int = 0
    delta: Delta = msgspec.field(default_factory=Delta)
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatChunk(WireOut):
    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChunkChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None
    service_tier: str | UnsetType | None = UNSET
    """As in :class:`ChatResponse`."""


class CompletionChoice(WireOut):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class CompletionResponse(WireOut):
    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None
    service_tier: str | UnsetType | None = UNSET
    """As in :class:`ChatResponse`."""


class CompletionChunk(CompletionResponse):
    """A streamed piece of a legacy completion (same shape as the response)."""


class ModelCard(WireOut):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "llmrouter"


class ModelList(WireOut):
    data: list[ModelCard]
    object: str = "list"


# --- helpers ---------------------------------------------------------------------------


def new_id(prefix: str = "chatcmpl") -> str:
    """A fresh OpenAI-style object id, e.g. ``chatcmpl-3f2a...``."""
    return f"{prefix}-{random_hex(32)}"


def now() -> int:
    return int(time.time())


_R = TypeVar("_R", ChatRequest, CompletionRequest)
_S = TypeVar("_S", bound=msgspec.Struct)
_CHAT_FIELDS = frozenset(ChatRequest.__struct_encode_fields__) - {"__extra__"}
_COMPLETION_FIELDS = frozenset(CompletionRequest.__struct_encode_fields__) - {"__extra__"}
_json_decoder = msgspec.json.Decoder()
_OUT_OF_RANGE = "Number out of range"
_UNKNOWN = "Object contains unknown field `"
_MISSING = "Object missing required field `"


def _raw_request(body: bytes | str | dict[str, Any], kind: type[_R]) -> dict[str, Any]:
    """The body as a dict (a copy of one given as a dict)."""
    if isinstance(body, dict):
        raw = dict(body)
        messages = raw.get("messages")
        if isinstance(messages, list) and any(isinstance(m, msgspec.Struct) for m in messages):
            # A library caller's conversation holding an answer's message (an
            # AssistantMessage, which converts to a request's message only as its fields).
            raw["messages"] = msgspec.to_builtins(messages)
    else:
        try:
            raw = _json_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise _not_json(body, exc, kind) from exc
        except UnicodeDecodeError as exc:  # msgspec's, for a string that is not UTF-8
            raise InvalidRequestError("request body is not valid JSON: it is not UTF-8") from exc
        except RecursionError as exc:
            raise InvalidRequestError("request body is not valid JSON: nested too deeply") from exc
        except TypeError:  # a caller's mistake (a list, say): msgspec's message names bytes only
            raise TypeError(
                f"a request is a dict, JSON text or bytes, or a {kind.__name__}, not {type(body).__name__}"
            ) from None
    if not isinstance(raw, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return raw


def _split_extra(raw: dict[str, Any], known: frozenset[str]) -> dict[str, Any]:
    """``raw`` with its unknown top-level fields moved into ``__extra__``."""
    raw.pop("__extra__", None)
    if not raw.keys() <= known:  # in C: most requests have no unknown field
        raw["__extra__"] = {key: raw.pop(key) for key in [k for k in raw if k not in known]}
    return raw


def _convert(raw: dict[str, Any], kind: type[_S]) -> _S:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise invalid_request(exc) from exc


def _not_json(body: bytes | str, exc: msgspec.DecodeError, kind: type[_R]) -> InvalidRequestError:
    """The error for a body the JSON decoder refused (``exc``)."""
    message = str(exc)
    if message.startswith(_OUT_OF_RANGE):
        # Valid JSON that no float holds (1e400). Decoded to Any, msgspec cannot say
        # where (``$[...]``); decoded to the request type it names the field.
        try:
            msgspec.json.decode(body, type=kind)
        except msgspec.ValidationError as typed:
            if str(typed).startswith(_OUT_OF_RANGE):
                return invalid_request(typed)
        except (msgspec.DecodeError, RecursionError, TypeError, UnicodeDecodeError):
            pass
        return InvalidRequestError("request body holds a number out of range (one no 64-bit float holds)")
    return InvalidRequestError(f"request body is not valid JSON: {json_fault(body, exc)}")


def json_fault(body: bytes | str, exc: msgspec.DecodeError) -> str:
    """What is wrong with ``body``, which msgspec could not decode (``exc``), in words.

    msgspec reports a ``\\ud800``-``\\udbff`` escape whose low half does not follow it (an
    unpaired surrogate, which no UTF-8 text can hold) as "Input data was truncated", as if
    the body had been cut short; the standard library's parser, run only here on the error
    path, tells the two apart: it takes lone surrogates."""
    message = str(exc)
    if message == "Input data was truncated":
        try:
            json.loads(body)
        except (ValueError, RecursionError):
            return message
        return "a string holds an unpaired UTF-16 surrogate escape (\\ud800-\\udbff without its low half)"
    return message


def error_param(exc: msgspec.ValidationError) -> str | None:
    """The field a msgspec validation error names, as OpenAI's ``param``."""
    # msgspec says "... - at `$.messages[0].role`"; OpenAI's param is "messages[0].role".
    # A field it does not know, or misses, is named in the message: "Object contains
    # unknown field `colour`" (then " - at `$.path`" when nested); param is that field's
    # path. A dict's value is "[...]" and its key "`key` in `$.path`": param stops at
    # the dict. A __post_init__ check names its field itself (_FieldError).
    param = getattr(exc.__cause__, "param", None)
    if isinstance(param, str):
        return param
    message = str(exc)
    marker = " - at `$"
    start = message.rfind(marker)
    if start == -1:
        marker = " - at `key` in `$"
        start = message.rfind(marker)
    path = message[start + len(marker) :].rstrip("`") if start != -1 else ""
    for prefix in (_MISSING, _UNKNOWN):
        if message.startswith(prefix):
            name = message[len(prefix) : message.index("`", len(prefix))]
            path = f"{path}.{name}"
            break
    path = path.partition("[...]")[0].removeprefix(".")
    return path or None


def invalid_request(exc: msgspec.ValidationError) -> InvalidRequestError:
    """The 400 for a request that does not fit the schema: ``param`` names the field, and
    a missing field is worded as OpenAI words it (``code: missing_required_parameter``)."""
    param = error_param(exc)
    if param is not None and str(exc).startswith(_MISSING):
        return _missing(param)
    return InvalidRequestError(str(exc), param=param)


def decode_chat_request(body: bytes | str | dict[str, Any]) -> ChatRequest:
    """Decode and validate a client's chat request, keeping unknown top-level fields in
    ``extra`` (keys the types do not model inside messages, tool calls and tools are
    dropped). A dict may hold messages, tool calls and tools already built as Structs.

    Raises:
        InvalidRequestError: the body is not JSON or does not fit the schema; ``param``
            names the offending field.
    """
    request = _convert(_split_extra(_raw_request(body, ChatRequest), _CHAT_FIELDS), ChatRequest)
    _check_options(request)
    for index, message in enumerate(request.messages):
        # OpenAI's schema requires it (the field is optional here only because the other
        # roles have none), and an upstream cannot tie an answer without it to its call.
        if message.role == "tool" and not message.tool_call_id:
            raise _missing(f"messages[{index}].tool_call_id")
        if message.tool_calls:
            for k, call in enumerate(message.tool_calls):
                # A call holds the part its type names (upstreams' answers are taken as
                # they come; only a client's request is held to it).
                if call.type == "function":
                    if call.function is _NO_FUNCTION_CALL:
                        raise _missing(f"messages[{index}].tool_calls[{k}].function")
                elif call.custom is None:
                    raise _missing(f"messages[{index}].tool_calls[{k}].custom")
    for index, tool in enumerate(request.tools or ()):
        if tool.type == "function":
            if tool.function is _NO_FUNCTION_DEFINITION:
                raise _missing(f"tools[{index}].function")
        elif tool.custom is None:
            raise _missing(f"tools[{index}].custom")
    return request


def _check_options(request: ChatRequest) -> None:
    """Refuse what OpenAI refuses and the types cannot say: an option that needs another
    one, a response format without the part its type names."""
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidRequestError(
            "The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled.",
            param="top_logprobs",
        )
    response_format = request.response_format
    if response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise _missing("response_format.json_schema")


def _missing(param: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Missing required parameter: '{param}'.", code="missing_required_parameter", param=param
    )


def decode_completion_request(body: bytes | str | dict[str, Any]) -> CompletionRequest:
    """Decode and validate a legacy completion request (see :func:`decode_chat_request`)."""
    return _convert(
        _split_extra(_raw_request(body, CompletionRequest), _COMPLETION_FIELDS), CompletionRequest
    )


def request_to_wire(request: ChatRequest | CompletionRequest) -> dict[str, Any]:
    """The request as an OpenAI JSON object, with the unknown fields put back at top level."""
    data: dict[str, Any] = msgspec.to_builtins(request)
    extra = data.pop("__extra__", None)
    if extra:
        for key, value in extra.items():
            data.setdefault(key, value)
    return data
