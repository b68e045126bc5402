"""RemoteProvider: one deployment served by an OpenAI-compatible server over HTTP.

Works with vLLM's OpenAI server (``vllm serve``), llama.cpp's ``llama-server``, Hugging Face
TGI's Messages API, and another llmrouter (``llmrouter serve``) — anything that speaks
``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``. The HTTP work lives in
:class:`llmrouter.openai_compat.OpenAICompatClient`; this class adds configuration,
capabilities and the provider life cycle.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec

from llmrouter.config import Timeouts
from llmrouter.errors import ConfigError, LLMRouterError, PermissionDeniedError, UpstreamAuthenticationError
from llmrouter.openai_compat import OpenAICompatClient
from llmrouter.openai_provider import OpenAICompatProvider
from llmrouter.provider import Health, ProviderOptions

__all__ = ["RemoteOptions", "RemoteProvider"]

# Checked as the config is read (`llmrouter models` too): each loaded before, then broke the
# deployment: "not a url" failed its start (503s), read_timeout -3 made every request 504,
# max_connections 0 or -1 made every request wait forever for a connection.
HttpUrl = Annotated[str, msgspec.Meta(pattern=r"^https?://[^/]")]
"""``http://`` or ``https://`` and a host: what the client can connect to."""
Seconds = Annotated[float, msgspec.Meta(gt=0)]

# A server's 403 codes that refuse the deployment's credentials, not this request: a
# llmrouter node's key that may not use the model, an OpenAI project without access to it
# ("model_not_found" with 403), an account in a region OpenAI does not serve. Other 403s
# stay the request's: a node passing on OpenRouter's moderation refusal sends no code.
_CREDENTIAL_REFUSALS = frozenset(
    {"model_not_allowed", "model_not_found", "unsupported_country_region_territory"}
)


def _credential_refusal(error: LLMRouterError) -> LLMRouterError:
    """A 403 that refuses the deployment's credentials as what it is, like a 401: the
    deployment's fault (502 ``upstream_authentication_failed``, counted toward its
    cooldown), not the client's key (a 403 is a per-request refusal to the router, and told
    the client that its own key may not use the model)."""
    if isinstance(error, PermissionDeniedError) and error.code in _CREDENTIAL_REFUSALS:
        return UpstreamAuthenticationError(
            f"{error.provider}: the server refused this deployment's credentials ({error.code}): {error.message}",
            provider=error.provider,
        )
    return error


class RemoteOptions(ProviderOptions):
    """Deployment keys for ``provider: remote`` (see docs/providers/remote.md)."""

    base_url: HttpUrl
    """The server's OpenAI API root, e.g. ``http://gpu-1:8000/v1`` (``/v1`` is added to a bare host)."""
    api_key: str | None = None
    """Sent as ``Authorization: Bearer``; wins over ``api_key_env``."""
    api_key_env: str | None = None
    """Name of an environment variable holding the API key, read at start-up."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Extra headers sent with every request."""
    connect_timeout: Seconds = 10.0
    """Seconds to open a TCP/TLS connection."""
    read_timeout: Seconds | None = 300.0
    """Seconds to wait for the response headers, a non-streamed answer, or the next stream chunk."""
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 256
    """Connection pool size (concurrent requests to this server)."""
    max_keepalive: Annotated[int, msgspec.Meta(ge=0)] = 64
    """Idle connections kept open for reuse (0: none)."""
    verify: bool | str = True
    """TLS certificate verification: true, false, or the path of a CA bundle."""
    stream_usage: bool = True
    """Ask for ``stream_options.include_usage``; turn off for servers that reject the field."""
    max_context: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """The model's context window, if known (reported in capabilities)."""
    check_model: bool = True
    """Health needs ``GET /v1/models`` to list ``model``; turn off for servers that answer
    for any model name (llama.cpp without ``--alias``)."""


class RemoteProvider(OpenAICompatProvider[RemoteOptions]):
    """A deployment on an OpenAI-compatible server.

    Args:
        model: the model name the server knows (what ``GET /v1/models`` lists).
        options: a :class:`RemoteOptions`; or pass its fields as keyword arguments.
        http_client: an ``httpx.AsyncClient`` to use (the caller closes it).
        transport: an httpx transport for the client built here (tests: ``httpx.MockTransport``).

    Example::

        async with RemoteProvider("Qwen/Qwen2.5-7B-Instruct", base_url="http://gpu-1:8000/v1") as p:
            reply = await p.chat(decode_chat_request({...}))
    """

    name: ClassVar[str] = "remote"
    Options: ClassVar[type[ProviderOptions]] = RemoteOptions

    def __init__(
        self,
        model: str,
        options: RemoteOptions | None = None,
        *,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        **option_fields: Any,
    ) -> None:
        if options is None:
            try:
                options = msgspec.convert(option_fields, RemoteOptions)
            except msgspec.ValidationError as exc:
                raise ConfigError(f"remote: {exc}") from exc
        elif option_fields:
            raise TypeError("pass either options or option keyword arguments, not both")
        super().__init__(model, options, http_client=http_client, transport=transport)

    def _api_key(self) -> str | None:
        opts = self.options
        if opts.api_key:
            return opts.api_key
        if opts.api_key_env:
            value = os.environ.get(opts.api_key_env)
            if not value:
                raise ConfigError(f"remote: environment variable {opts.api_key_env} (api_key_env) is not set")
            return value
        return None

    def _make_client(self) -> OpenAICompatClient:
        opts = self.options
        return OpenAICompatClient(
            opts.base_url,
            provider=self.name,
            api_key=self._api_key(),
            headers=opts.headers,
            timeouts=Timeouts(connect=opts.connect_timeout, first_token=opts.read_timeout),
            http_client=self._http_client,
            transport=self._transport,
            max_connections=opts.max_connections,
            max_keepalive=opts.max_keepalive,
            verify=opts.verify,
            stream_usage=opts.stream_usage,
            refine_error=_credential_refusal,
        )

    async def health(self) -> Health:
        """``GET /v1/models``: ok when it answers and lists this deployment's model."""
        client = await self._ready()
        started = time.perf_counter()
        try:
            ids = {card.id for card in await client.list_models()}
        except LLMRouterError as exc:
            return Health(ok=False, detail=exc.message, latency_ms=(time.perf_counter() - started) * 1000)
        latency = (time.perf_counter() - started) * 1000
        where = _without_credentials(client.base_url)
        if self.options.check_model and ids and self.model not in ids:
            return Health(ok=False, latency_ms=latency, detail=f"{where} does not list model {self.model!r}")
        return Health(ok=True, latency_ms=latency, detail=f"{where} serves {self.model!r}")

    @classmethod
    def discovery_note(cls) -> str:
        return "remote: configure base_url per deployment (not auto-discovered)"

    def __repr__(self) -> str:
        return f"RemoteProvider(model={self.model!r}, base_url={self.options.base_url!r})"


def _without_credentials(url: str) -> str:
    """``url`` without its user info and query string, where credentials may be
    (``http://svc:pw@host/v1?token=...``): a health detail reaches ``/ready``, which
    needs no key."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
