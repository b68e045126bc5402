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
from llmrouter.errors import ConfigError, InvalidRequestError, UnsupportedFeatureError
from llmrouter.types import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
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
    "refuse_tool_calling",
]


MODEL_LOADING = threading.Lock()
"""Held while a provider loads a model in a worker thread, so that a process loads one
model at a time (the transformers and vLLM providers take it). transformers, which vLLM
uses too, imports its modules lazily on first use, and two threads doing that at once
fail (``ImportError: cannot import name 'AutoModelForCausalLM'``): with four
transformers deployments starting together, some failed every time."""


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What a deployment can do; the router rejects requests it cannot serve."""

    streaming: bool = True
    tools: bool = False
    json_mode: bool = False
    vision: bool = False
    completions: bool = False
    max_context: int | None = None


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
        return Capabilities()

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
    ignored, the request would get a 200 of prose where the client expects a call. Asked
    in today's fields or in the deprecated ``functions``/``function_call`` (which land in
    ``extra``). Asking for no call (``"none"``, tools or not), or leaving it to the model
    with no tools to call (``tool_choice: "auto"``), asks for nothing such a provider
    cannot do.

    Raises:
        UnsupportedFeatureError: naming the field that asks for a call.
    """
    function_call = request.extra.get("function_call")
    asked = (
        ("tools", bool(request.tools) and request.tool_choice != "none"),
        ("tool_choice", request.tool_choice not in (None, "none", "auto")),
        ("functions", bool(request.extra.get("functions")) and function_call != "none"),
        ("function_call", function_call not in (None, "none")),
    )
    for param, present in asked:
        if present:
            raise UnsupportedFeatureError(
                f"`{param}` is not supported by the {provider} provider (no tool calling)",
                param=param,
                provider=provider,
            )
