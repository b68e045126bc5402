"""The Provider contract: the only thing a model backend implements.

A provider instance serves one deployment (one upstream model). It is an async
context manager: ``start()`` loads models or opens clients, ``aclose()`` releases
them. Cancellation is the caller's anyio cancel scope: when the awaiting task is
cancelled, ``chat`` must stop promptly, and when a ``stream`` generator is closed
(``aclose``) it must close its upstream stream, abort the engine request or stop
the generate loop, and leak no thread.

Streams end with a chunk that carries ``usage`` (its ``choices`` may be empty),
whether or not the client asked for it: the router needs usage for billing and
strips that chunk when the client did not ask for ``stream_options.include_usage``.
Responses from ``chat`` always carry ``usage``; when the provider had to count the
tokens itself, ``usage.estimated`` is True.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import msgspec

from llmrouter.config import ModelGroup
from llmrouter.errors import (
    ConfigError,
    ContextWindowExceededError,
    InvalidRequestError,
    UnsupportedFeatureError,
)
from llmrouter.types import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ImagePart,
    ModelCard,
)

__all__ = [
    "MODEL_LOADING",
    "Capabilities",
    "Health",
    "NoOptions",
    "Provider",
    "ProviderOptions",
    "check_prompt_ids",
    "check_token_ids",
    "refuse_audio_output",
    "refuse_tool_calling",
]


MODEL_LOADING = threading.Lock()
"""Held while a provider loads a model in a worker thread, so that a process loads one
model at a time (the transformers and vLLM providers take it). transformers, which vLLM
uses too, imports its modules lazily on first use, and two threads doing that at once
fail (``ImportError: cannot import name 'AutoModelForCausalLM'``): with four
transformers deployments starting together, some failed every time."""


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What a deployment can serve, as its provider declares it (read once it started).

    The router passes over a deployment that cannot serve a request (:meth:`refusal`):
    a stream when not ``streaming``, a ``/v1/completions`` request when not
    ``completions``, a request that asks for a tool call when not ``tools``, for JSON
    output (``response_format``) when not ``json_mode``, with an image when not
    ``vision``, and one whose prompt, as the router estimates it (tiktoken), has more
    tokens than ``max_context`` (unless ``context_checked``: a provider that counts the
    prompt exactly, with the model's own tokenizer, refuses it itself, as a
    ``ContextWindowExceededError`` the router treats the same way; an estimate would refuse
    prompts that fit). That is no failure of the deployment (no cooldown); the
    request goes to the next deployment or fallback group, and gets the refusal when none
    can serve it. Declare no less than the provider serves: what is declared missing is
    never sent to it.
    """

    streaming: bool = True
    tools: bool = False
    json_mode: bool = False
    vision: bool = False
    completions: bool = False
    max_context: int | None = None
    context_checked: bool = False
    """The provider refuses a prompt over ``max_context`` itself, counted exactly."""

    @property
    def serves_all(self) -> bool:
        """True when nothing declared here rules out a request (no check needed)."""
        return (
            self.streaming
            and self.tools
            and self.json_mode
            and self.vision
            and self.completions
            and self.unchecked_context is None
        )

    @property
    def unchecked_context(self) -> int | None:
        """``max_context`` where the router must check it (the provider does not)."""
        return None if self.context_checked else self.max_context

    def refusal(
        self,
        request: ChatRequest | CompletionRequest,
        *,
        stream: bool,
        prompt_tokens: int,
        deployment: str,
        provider: str,
    ) -> InvalidRequestError | None:
        """The error for a request these capabilities cannot serve; None when they can.

        Args:
            request: the request.
            stream: whether it is to be streamed.
            prompt_tokens: its prompt's estimated tokens (only read with ``unchecked_context``).
            deployment: the deployment's id, for the message.
            provider: the deployment's provider, for the error.
        """
        if isinstance(request, ChatRequest):
            param = self._missing_chat_feature(request)
            prompt_param = "messages"
        else:
            param = None if self.completions else "model"
            prompt_param = "prompt"
        if param is None and stream and not self.streaming:
            param = "stream"
        if param is not None:
            return UnsupportedFeatureError(
                f"deployment {deployment!r} ({provider}) does not support {_feature_name(param)}",
                param=param,
                provider=provider,
            )
        if self.unchecked_context is not None and prompt_tokens > self.unchecked_context:
            return ContextWindowExceededError(
                f"the prompt (about {prompt_tokens} tokens) does not fit the context window of "
                f"deployment {deployment!r} ({self.max_context} tokens)",
                param=prompt_param,
                provider=provider,
            )
        return None

    def _missing_chat_feature(self, request: ChatRequest) -> str | None:
        """The field of ``request`` that asks for what is not declared, or None."""
        if not self.tools and (param := _tool_calling_field(request)) is not None:
            return param
        if (
            not self.json_mode
            and request.response_format is not None
            and request.response_format.type != "text"
        ):
            return "response_format"
        if not self.vision:
            for index, message in enumerate(request.messages):
                if isinstance(message.content, list) and any(
                    isinstance(p, ImagePart) for p in message.content
                ):
                    return f"messages[{index}].content"
        return None


def _feature_name(param: str) -> str:
    """What the field ``param`` asks for, in a refusal's words."""
    if param.startswith("messages["):
        return f"images (`{param}`)"
    names = {"stream": "streaming", "model": "/v1/completions", "response_format": "JSON output"}
    return names.get(param, f"tool calling (`{param}`)")


_SERVES_CHAT = Capabilities(tools=True, json_mode=True, vision=True)


class Health(msgspec.Struct, kw_only=True):
    ok: bool
    detail: str = ""
    latency_ms: float | None = None


class ProviderOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base for a provider's own deployment options (unknown keys are config errors)."""


class NoOptions(ProviderOptions):
    pass


OptionsT = TypeVar("OptionsT", bound=ProviderOptions)


class Provider(abc.ABC, Generic[OptionsT]):
    """Base class of every provider.

    Subclasses set ``name`` (the entry-point name, e.g. ``"remote"``), ``Options``
    (a :class:`ProviderOptions` subclass describing the keys a deployment may set)
    and implement :meth:`chat` and :meth:`stream`.

    Args:
        model: the upstream model this instance serves.
        options: the provider's options; defaults to ``Options()``.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[ProviderOptions]] = NoOptions
    direct: ClassVar[bool] = False
    """Clients may name ``<provider>/<model>`` without configuration (``router.allow_direct``).
    Only for providers where naming a model is cheap and bounded (a daemon's or an API's
    models), never for ones that load weights or need per-deployment settings."""

    def __init__(self, model: str, options: OptionsT | None = None) -> None:
        self.model = model
        self.options: OptionsT = options if options is not None else self.Options()  # type: ignore[assignment]

    @classmethod
    def from_config(
        cls, model: str, options: Mapping[str, Any] | None = None, *, path: str = ""
    ) -> Provider[Any]:
        """Build a provider from raw config keys, failing with the bad field's path."""
        try:
            # Any: ``Options`` cannot be typed ``type[OptionsT]`` (a ClassVar may not hold a type
            # variable), but by construction it is this subclass's OptionsT.
            parsed: Any = msgspec.convert(dict(options or {}), cls.Options, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{path or cls.name}: {exc}") from exc
        return cls(model, parsed)

    @property
    def capabilities(self) -> Capabilities:
        """What this deployment serves. By default everything but legacy completions (a
        provider that implements :meth:`complete` declares them): a provider that leaves
        this alone refuses what it cannot serve itself, as before the router read it."""
        return _SERVES_CHAT

    async def start(self) -> None:
        """Load the model / open clients. Called once before the first request."""

    async def aclose(self) -> None:
        """Release everything ``start`` acquired. Safe to call twice."""

    @abc.abstractmethod
    async def chat(self, request: ChatRequest) -> ChatResponse:
        """One chat completion, with ``usage`` filled."""

    @abc.abstractmethod
    def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Stream a chat completion; the last chunk carries ``usage``."""

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        """A legacy prompt completion; only where ``capabilities.completions``."""
        raise UnsupportedFeatureError(
            f"provider {self.name!r} does not support /v1/completions", provider=self.name
        )

    def stream_complete(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        """Stream a legacy prompt completion; the last chunk carries ``usage``."""
        raise UnsupportedFeatureError(
            f"provider {self.name!r} does not support /v1/completions", provider=self.name
        )

    @classmethod
    async def discover(cls) -> list[ModelGroup]:
        """Model groups this provider can serve with no configuration (zero-config start).

        Called by ``llmrouter serve`` when the config names no models. Must be quick
        (probe with a short timeout) and must not raise: return ``[]`` when nothing is
        found. Override :meth:`discovery_note` to say what was (not) found.
        """
        return []

    @classmethod
    def discovery_note(cls) -> str:
        """One line for the start-up summary, e.g. ``"ollama: no daemon at 127.0.0.1:11434"``."""
        return ""

    async def list_models(self) -> list[ModelCard]:
        return [ModelCard(id=self.model, owned_by=self.name or "llmrouter")]

    async def health(self) -> Health:
        return Health(ok=True)

    async def __aenter__(self) -> Provider[OptionsT]:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r})"


def check_token_ids(ids: Collection[int], vocabulary: int, *, param: str, provider: str) -> None:
    """For local providers: refuse (400) token ids their model does not have, outside
    ``0 .. vocabulary - 1`` (a completion's prompt ids, ``logit_bias`` keys).

    Raises:
        InvalidRequestError: naming one such id, and ``param``.
    """
    if not ids:
        return
    lowest, highest = min(ids), max(ids)
    if lowest < 0 or highest >= vocabulary:
        raise InvalidRequestError(
            f"token id {lowest if lowest < 0 else highest} is not in this model's vocabulary "
            f"(0 to {vocabulary - 1})",
            param=param,
            provider=provider,
        )


def check_prompt_ids(ids: list[int], vocabulary: int, *, param: str, provider: str) -> None:
    """For local providers: refuse (400) a prompt their model cannot take, with no tokens
    at all or with an id outside its vocabulary (:func:`check_token_ids`). In the
    transformers engine either failed the forward pass, and with it every request
    batched beside it; vLLM's engine client could not serialise a negative id (an
    ``OverflowError``, not a 400).

    Raises:
        InvalidRequestError: on either, naming ``param``.
    """
    if not ids:
        raise InvalidRequestError("the prompt has no tokens", param=param, provider=provider)
    check_token_ids(ids, vocabulary, param=param, provider=provider)


def refuse_tool_calling(request: ChatRequest, provider: str) -> None:
    """Refuse a request that asks for a tool call, from a provider that cannot make one:
    ignored, the request would get a 200 of prose where the client expects a call (see
    :func:`_tool_calling_field`).

    Raises:
        UnsupportedFeatureError: naming the field that asks for a call.
    """
    param = _tool_calling_field(request)
    if param is not None:
        raise UnsupportedFeatureError(
            f"`{param}` is not supported by the {provider} provider (no tool calling)",
            param=param,
            provider=provider,
        )


def _tool_calling_field(request: ChatRequest) -> str | None:
    """The field of ``request`` that asks for a tool call, or None. Asked in today's
    fields or in the deprecated ``functions``/``function_call`` (which land in
    ``extra``). Asking for no call (``"none"``, tools or not), or leaving it to the model
    with no tools to call (``tool_choice: "auto"``), asks for nothing."""
    function_call = request.extra.get("function_call")
    asked = (
        ("tools", bool(request.tools) and request.tool_choice != "none"),
        ("tool_choice", request.tool_choice not in (None, "none", "auto")),
        ("functions", bool(request.extra.get("functions")) and function_call != "none"),
        ("function_call", function_call not in (None, "none")),
    )
    for param, present in asked:
        if present:
            return param
    return None


def refuse_audio_output(request: ChatRequest, provider: str) -> None:
    """Refuse a request for an audio answer (``modalities`` naming ``"audio"``, a field
    that lands in ``extra``), from a provider that answers in text only: ignored, the
    client would get text where it expects audio.

    Raises:
        UnsupportedFeatureError: naming ``modalities``.
    """
    modalities = request.extra.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        raise UnsupportedFeatureError(
            f"audio output (`modalities`) is not supported by the {provider} provider",
            param="modalities",
            provider=provider,
        )
