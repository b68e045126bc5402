"""OllamaProvider: one deployment served by an Ollama daemon, through the official client.

Chat and streaming go to ``POST /api/chat`` (NDJSON when streaming), legacy
completions to ``POST /api/generate`` in raw mode, the model list comes from
``GET /api/tags``. Cancelling a call, or closing a stream generator, closes the HTTP
response, which is how Ollama learns to stop generating.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, ClassVar, cast

import anyio
import httpx
import msgspec
import ollama

from llmrouter.config import ModelGroup
from llmrouter.errors import ModelNotFoundError, UpstreamError
from llmrouter.provider import Capabilities, Health, Provider, ProviderOptions
from llmrouter.types import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    new_id,
    now,
)
from llmrouter_ollama import _discovery, _translate
from llmrouter_ollama._errors import PROVIDER, record_error_response, translate_errors

__all__ = ["OllamaOptions", "OllamaProvider"]

# Checked as the config is read: a negative timeout loaded, then failed every request.
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class OllamaOptions(ProviderOptions):
    """Deployment keys for ``provider: ollama``."""

    host: str | None = None
    """Daemon URL; default ``OLLAMA_HOST``, else ``http://127.0.0.1:11434``."""
    keep_alive: str | float | None = None
    """How long Ollama keeps the model loaded after a request (``"10m"``, ``-1``...)."""
    model_options: dict[str, Any] = msgspec.field(default_factory=dict)
    """Ollama runtime options sent with every request (``num_ctx``, ``top_k``...);
    request fields win over them."""
    connect_timeout: Seconds = 5.0
    read_timeout: Seconds | None = None
    """Seconds between bytes; None leaves it to the router's first-token/total timeouts
    (loading a large model can take a while)."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Extra HTTP headers, e.g. for a daemon behind an authenticating proxy."""


class OllamaProvider(Provider[OllamaOptions]):
    """A model on an Ollama daemon.

    Args:
        model: the Ollama model name (``llama3.2``, ``qwen2.5:0.5b``).
        options: :class:`OllamaOptions`.
        client: an ``ollama.AsyncClient`` to use instead of building one (not closed by
            :meth:`aclose`).
        transport: an httpx transport for the client this provider builds (tests).
    """

    name: ClassVar[str] = "ollama"
    direct: ClassVar[bool] = True
    Options: ClassVar[type[ProviderOptions]] = OllamaOptions

    _last_discovery: ClassVar[_discovery.DiscoveryResult | None] = None

    def __init__(
        self,
        model: str,
        options: OllamaOptions | None = None,
        *,
        client: ollama.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(model, options)
        self.host = _discovery.resolve_host(self.options.host)
        self._client = client
        self._owns_client = client is None
        self._transport = transport
        self._capabilities = Capabilities(tools=True, json_mode=True, vision=True, completions=True)

    # --- lifecycle ------------------------------------------------------------------

    def _build_client(self) -> ollama.AsyncClient:
        timeout = httpx.Timeout(self.options.read_timeout, connect=self.options.connect_timeout)
        kwargs: dict[str, Any] = {"event_hooks": {"response": [record_error_response]}}
        if self._transport is not None:
            kwargs["transport"] = self._transport
        return ollama.AsyncClient(
            host=self.host, timeout=timeout, headers=self.options.headers or None, **kwargs
        )

    @property
    def client(self) -> ollama.AsyncClient:
        if self._client is None:
            self._client = self._build_client()
        return self._client

    async def start(self) -> None:
        """Open the client and, when the daemon answers, learn the model's capabilities.

        A daemon that is down at start-up is not an error: it may come up later, and
        :meth:`health` says so meanwhile.
        """
        _ = self.client
        with contextlib.suppress(Exception):
            with anyio.fail_after(2.0):
                info = await self.client.show(self.model)
            self._capabilities = _capabilities_from_show(info, self._capabilities)

    async def aclose(self) -> None:
        if self._client is not None and self._owns_client:
            await self.client.close()
            self._client = None

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    # --- chat -----------------------------------------------------------------------

    def _chat_body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        return _translate.build_chat_body(
            request,
            self.model,
            stream=stream,
            default_options=self.options.model_options,
            keep_alive=self.options.keep_alive,
        )

    async def _post_chat(self, body: dict[str, Any], *, stream: bool) -> Any:
        # AsyncClient.chat() re-validates tools through its own pydantic model, which
        # drops nested JSON-schema keys (object properties, enums in arrays, minimum...).
        # The client's request method sends our body as is and keeps its NDJSON parsing
        # and ResponseError handling; the tests pin this against the wire format.
        return await self.client._request(ollama.ChatResponse, "POST", "/api/chat", json=body, stream=stream)

    async def chat(self, request: ChatRequest) -> ChatResponse:
        body = self._chat_body(request, stream=False)
        async with translate_errors(self.model, self.host):
            part = await self._post_chat(body, stream=False)
        return _translate.to_chat_response(_final(part), request)

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        body = self._chat_body(request, stream=True)
        translator = _translate.ChatStreamTranslator(request)
        async with translate_errors(self.model, self.host):
            parts = await self._post_chat(body, stream=True)
            # aclosing: when our consumer closes or is cancelled, the client's generator
            # leaves its `async with client.stream(...)`, which closes the connection.
            async with contextlib.aclosing(parts):
                async for part in parts:
                    for chunk in translator.translate(part):
                        yield chunk
                    if translator.done:
                        break
        if not translator.done:
            raise UpstreamError("ollama: the stream ended before the final (done) part", provider=PROVIDER)

    # --- legacy completions -----------------------------------------------------------

    def _generate_body(self, request: CompletionRequest) -> dict[str, Any]:
        return _translate.build_generate_body(
            request,
            self.model,
            default_options=self.options.model_options,
            keep_alive=self.options.keep_alive,
        )

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        body = self._generate_body(request)
        async with translate_errors(self.model, self.host):
            part = await self.client.generate(**body, stream=False)
        return _translate.completion_response(_final(part), request)

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        body = self._generate_body(request)
        stream_id, created = new_id("cmpl"), now()
        text: list[str] = []
        done = False
        async with translate_errors(self.model, self.host):
            # The client returns its async generator, typed as a plain iterator.
            parts = cast(AsyncGenerator[Any, None], await self.client.generate(**body, stream=True))
            async with contextlib.aclosing(parts):
                async for part in parts:
                    for chunk in _translate.completion_chunk(
                        part, request, stream_id, created, "".join(text)
                    ):
                        yield chunk
                    text.append(part.response or "")
                    if part.done:
                        done = True
                        break
        if not done:
            raise UpstreamError("ollama: the stream ended before the final (done) part", provider=PROVIDER)

    # --- models and health -----------------------------------------------------------

    async def list_models(self) -> list[ModelCard]:
        """Every model pulled on this deployment's daemon (``GET /api/tags``)."""
        async with translate_errors(self.model, self.host):
            listing = await self.client.list()
        return [
            ModelCard(
                id=model.model,
                owned_by="ollama",
                created=int(model.modified_at.timestamp()) if model.modified_at else 0,
            )
            for model in listing.models
            if model.model
        ]

    async def health(self) -> Health:
        """Healthy when the daemon answers and has this deployment's model."""
        started = time.perf_counter()
        try:
            names = {card.id for card in await self.list_models()}
        except Exception as exc:  # noqa: BLE001 - health reports, never raises
            return Health(ok=False, detail=str(exc))
        latency = (time.perf_counter() - started) * 1000
        if self.model in names or f"{self.model}:latest" in names:
            return Health(ok=True, latency_ms=latency)
        error = ModelNotFoundError(
            f"model {self.model!r} is not pulled on {self.host} (ollama pull {self.model})"
        )
        return Health(ok=False, detail=error.message, latency_ms=latency)

    # --- zero-config ------------------------------------------------------------------

    @classmethod
    async def discover(cls) -> list[ModelGroup]:
        """One model group per model of the daemon at ``OLLAMA_HOST`` (0.5 s probe).

        Safe to call again at any time (``/ready``, a refresh): each call probes anew;
        see :meth:`rediscover` for a rate-limited variant.
        """
        result = await _discovery.probe()
        cls._last_discovery = result
        return _discovery.groups_for(result)

    @classmethod
    async def rediscover(cls, *, min_interval: float = 5.0) -> list[ModelGroup]:
        """Like :meth:`discover`, but reuses a probe younger than ``min_interval`` seconds,
        so a readiness endpoint polled every second does not probe every second."""
        last = cls._last_discovery
        if last is not None and time.monotonic() - last.at < min_interval:
            return _discovery.groups_for(last)
        return await cls.discover()

    @classmethod
    def discovery_note(cls) -> str:
        last = cls._last_discovery
        if last is None:
            return f"ollama: not probed yet ({_discovery.resolve_host()})"
        return last.note


def _final(part: Any) -> Any:
    """``part``, the whole answer to a ``stream: false`` request, which Ollama always marks
    ``done``. One that is not (``{}``, an answer cut short) is the daemon failing, not an
    empty completion to bill and cache."""
    if part.done is not True:
        raise UpstreamError("ollama: the answer is not final (no `done: true`)", provider=PROVIDER)
    return part


def _capabilities_from_show(info: Any, current: Capabilities) -> Capabilities:
    """Narrow the defaults with what ``/api/show`` says the model can do."""
    caps = set(info.capabilities or ())
    max_context = None
    for key, value in (info.modelinfo or {}).items():
        if key.endswith(".context_length") and isinstance(value, int):
            max_context = value
    if not caps:
        return msgspec.structs.replace(current, max_context=max_context or current.max_context)
    return Capabilities(
        streaming=True,
        tools="tools" in caps,
        json_mode=True,
        vision="vision" in caps,
        completions="completion" in caps or "insert" in caps,
        max_context=max_context,
    )
