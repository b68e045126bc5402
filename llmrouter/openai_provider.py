"""A base class for providers that speak the OpenAI HTTP API.

The remote provider (vLLM's server, llama.cpp, TGI, another llmrouter) and OpenRouter
share everything but their options: the pooled :class:`OpenAICompatClient`, its life
cycle, and the delegation of chat, streams, completions and model listing. A subclass
says how to build the client (:meth:`_make_client`) and may add provider fields to each
request body (:meth:`_prepare`).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

import httpx

from llmrouter.openai_compat import OpenAICompatClient
from llmrouter.provider import Capabilities, OptionsT, Provider
from llmrouter.types import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
)

__all__ = ["OpenAICompatProvider"]

_Q = TypeVar("_Q", ChatRequest, CompletionRequest)


class OpenAICompatProvider(Provider[OptionsT]):
    """A deployment reached through an OpenAI-compatible HTTP API.

    Args:
        model: the model name the upstream knows.
        options: the subclass's options.
        http_client: an ``httpx.AsyncClient`` to use (the caller closes it).
        transport: an httpx transport for the pool built here (tests: ``httpx.MockTransport``).
    """

    def __init__(
        self,
        model: str,
        options: OptionsT | None = None,
        *,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(model, options)
        self._http_client = http_client
        self._transport = transport
        self._client: OpenAICompatClient | None = None

    @abc.abstractmethod
    def _make_client(self) -> OpenAICompatClient:
        """The client for this deployment (``self._http_client`` / ``self._transport`` passed on)."""

    def _prepare(self, request: _Q) -> _Q:
        """The request as this upstream wants it (default: unchanged)."""
        return request

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            streaming=True,
            tools=True,
            json_mode=True,
            vision=True,
            completions=True,
            max_context=getattr(self.options, "max_context", None),
        )

    async def start(self) -> None:
        """Open the connection pool (connections themselves open on first use)."""
        if self._client is None:
            self._client = self._make_client()

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _ready(self) -> OpenAICompatClient:
        # Library users may call without start(); open the pool on first use.
        if self._client is None:
            await self.start()
        assert self._client is not None
        return self._client

    async def chat(self, request: ChatRequest) -> ChatResponse:
        client = await self._ready()
        return await client.chat(self._prepare(request), model=self.model)

    def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        if self._client is not None:
            # The client's own generator: no extra async layer per chunk.
            return self._client.stream(self._prepare(request), model=self.model)
        return self._after_start(lambda client: client.stream(self._prepare(request), model=self.model))

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        client = await self._ready()
        return await client.complete(self._prepare(request), model=self.model)

    def stream_complete(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        if self._client is not None:
            return self._client.stream_complete(self._prepare(request), model=self.model)
        return self._after_start(
            lambda client: client.stream_complete(self._prepare(request), model=self.model)
        )

    async def _after_start(self, open_stream: Any) -> AsyncGenerator[Any, None]:
        stream = open_stream(await self._ready())
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()

    async def list_models(self) -> list[ModelCard]:
        """The models the upstream lists (not only this deployment's)."""
        client = await self._ready()
        return await client.list_models()
