"""OpenRouterProvider: models on OpenRouter, through the shared OpenAI-compatible client.

OpenRouter speaks the OpenAI API with extras, which this class adds:

- the API key from the deployment's ``api_key`` or ``OPENROUTER_API_KEY``;
- attribution headers ``HTTP-Referer`` and ``X-Title`` when configured;
- provider-routing preferences (``provider: {...}``), a fallback list (``models: [...]``)
  and ``route``, from the deployment config;
- ``usage: {include: true}``, so that the response's ``usage.cost`` (USD) comes back; the
  router records that figure as the request's cost, marked provider-reported;
- errors in the body of a 200 response (a model that failed mid-answer).

HTTP statuses map through :func:`llmrouter.errors.error_for_status` (401 authentication,
402 out of credit, 429 and 5xx retryable, each with ``Retry-After`` when sent); its 404
"No endpoints found that support …" is a 400 ``unsupported_feature``, and its 400
"<id> is not a valid model ID" for the deployment's own model an
``UpstreamModelNotFoundError`` (502 ``upstream_model_not_found``).
"""

from __future__ import annotations

import os
import re
import time
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import httpx
import msgspec

from llmrouter.config import Deployment, ModelGroup, Timeouts
from llmrouter.errors import (
    AuthenticationError,
    InvalidRequestError,
    LLMRouterError,
    NotFoundError,
    UnsupportedFeatureError,
    UpstreamError,
    UpstreamModelNotFoundError,
    error_for_status,
)
from llmrouter.openai_compat import OpenAICompatClient, error_from_body
from llmrouter.openai_provider import OpenAICompatProvider
from llmrouter.provider import Health, ProviderOptions
from llmrouter.types import (
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
)

__all__ = ["API_KEY_ENV", "DEFAULT_BASE_URL", "OpenRouterOptions", "OpenRouterProvider"]

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
API_KEY_ENV = "OPENROUTER_API_KEY"
MODELS_ENV = "LLMROUTER_OPENROUTER_MODELS"
"""Comma-separated OpenRouter model ids that zero-config start registers (besides ``openrouter/auto``)."""

_Answer = TypeVar("_Answer", ChatResponse, CompletionResponse)

# Fields a client may send that change which model answers (and so what it costs);
# dropped unless the deployment sets ``client_routing: true``.
_CLIENT_ROUTING_FIELDS = ("models", "route")


# OpenRouter answers 404 when none of a model's endpoints can take the request as asked
# ("No endpoints found that support tool use", "... the provided 'tool_choice' value",
# "... that can handle the requested parameters"). Not its "matching your data policy":
# that is the account's setting, the deployment's fault.
_UNSUPPORTED = re.compile(r"No endpoints found that (?:support|can handle)", re.IGNORECASE)


# OpenRouter answers 400 "<id> is not a valid model ID" for a model it does not have (retired,
# or misspelt in the config).
_UNKNOWN_MODEL = re.compile(r"^(?P<model>\S+) is not a valid model ID")


def _refusal(error: LLMRouterError) -> LLMRouterError:
    """OpenRouter's "no endpoint supports that" 404 as what it is: a refusal of this
    request (400 ``unsupported_feature``), which moves the request on to a deployment that
    can take it and does not count against this one (a 404 would cool it down)."""
    if isinstance(error, NotFoundError) and _UNSUPPORTED.search(error.message):
        return UnsupportedFeatureError(error.message, provider=error.provider)
    return error


def _unknown_model(error: LLMRouterError, configured: set[str]) -> LLMRouterError:
    """OpenRouter's 400 for a model id it does not know, when the id is one the deployment
    sends (its ``model`` or ``fallback_models``): the deployment's fault, not the request's.
    As a 400 it failed the request at once, no fallback tried, telling the client about a
    model it never named; an ``UpstreamModelNotFoundError`` moves it on and counts against
    this deployment (not the caller's 404 ``model_not_found``: the caller named a group the
    router has). An id a client sent in ``models`` (``client_routing``) stays its 400; a
    direct ``openrouter/<id>`` name the router answers as the client's own 404."""
    unknown = _UNKNOWN_MODEL.match(error.message)
    if isinstance(error, InvalidRequestError) and unknown and unknown["model"] in configured:
        return UpstreamModelNotFoundError(error.message, model=unknown["model"], provider=error.provider)
    return error


# Checked as the config is read, as the remote provider's (a read_timeout of -3 made every
# request 504, a max_connections of 0 made every request wait forever).
HttpUrl = Annotated[str, msgspec.Meta(pattern=r"^https?://[^/]")]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class OpenRouterOptions(ProviderOptions):
    """Deployment keys for ``provider: openrouter`` (see docs/providers/openrouter.md)."""

    api_key: str | None = None
    """Default: the environment variable named by ``api_key_env``."""
    api_key_env: str = API_KEY_ENV
    base_url: HttpUrl = DEFAULT_BASE_URL
    http_referer: str | None = None
    """Sent as ``HTTP-Referer``: your app's URL, for OpenRouter's attribution."""
    x_title: str | None = None
    """Sent as ``X-Title``: your app's name, for OpenRouter's attribution."""
    provider_preferences: dict[str, Any] | None = None
    """OpenRouter's provider routing object, sent as ``provider`` (``order``, ``sort``,
    ``allow_fallbacks``, ``data_collection``, ``only``, ``ignore``, ``max_price``...)."""
    fallback_models: list[str] = msgspec.field(default_factory=list)
    """Sent as ``models``: OpenRouter tries them in order when the model fails."""
    route: Literal["fallback"] | None = None
    transforms: list[str] | None = None
    """E.g. ``["middle-out"]``."""
    client_routing: bool = False
    """Let clients send ``models`` / ``route`` themselves (they pick the model that answers)."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    connect_timeout: Seconds = 10.0
    read_timeout: Seconds | None = 300.0
    """Seconds to wait for headers, a non-streamed answer, or the next stream chunk."""
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 256
    max_context: Annotated[int, msgspec.Meta(ge=1)] | None = None


class OpenRouterProvider(OpenAICompatProvider[OpenRouterOptions]):
    """One model on OpenRouter (``model`` is OpenRouter's id, e.g. ``openai/gpt-4o-mini``).

    Args:
        model: the OpenRouter model id.
        options: :class:`OpenRouterOptions`.
        http_client: an ``httpx.AsyncClient`` to use (the caller closes it).
        transport: an httpx transport for the client built here (tests).
    """

    name: ClassVar[str] = "openrouter"
    direct: ClassVar[bool] = True
    Options: ClassVar[type[ProviderOptions]] = OpenRouterOptions

    # --- lifecycle ------------------------------------------------------------------

    def api_key(self) -> str | None:
        return self.options.api_key or os.environ.get(self.options.api_key_env) or None

    def _headers(self) -> dict[str, str]:
        headers = dict(self.options.headers)
        if self.options.http_referer:
            headers["HTTP-Referer"] = self.options.http_referer
        if self.options.x_title:
            headers["X-Title"] = self.options.x_title
        return headers

    def _make_client(self) -> OpenAICompatClient:
        """The client; a missing key fails here (at start), saying what to set."""
        key = self.api_key()
        if not key:
            raise AuthenticationError(
                f"openrouter: no API key: set {self.options.api_key_env} or the deployment's api_key",
                provider=self.name,
            )
        opts = self.options
        return OpenAICompatClient(
            opts.base_url,
            provider=self.name,
            api_key=key,
            headers=self._headers(),
            timeouts=Timeouts(connect=opts.connect_timeout, first_token=opts.read_timeout),
            http_client=self._http_client,
            transport=self._transport,
            max_connections=opts.max_connections,
            refine_error=self._refine_error,
        )

    def _refine_error(self, error: LLMRouterError) -> LLMRouterError:
        """An upstream error answer as what it means for this deployment (see above)."""
        return _unknown_model(_refusal(error), {self.model, *self.options.fallback_models})

    # --- requests -------------------------------------------------------------------

    def _prepare(self, request: Any) -> Any:
        """The request with OpenRouter's extras: usage accounting, routing preferences."""
        opts = self.options
        extra = dict(request.extra)
        if not opts.client_routing:
            for key in _CLIENT_ROUTING_FIELDS:
                extra.pop(key, None)
        client_prefs = extra.get("provider")
        if opts.provider_preferences:
            # The operator's preferences (data policy, price caps) win over the client's.
            base = client_prefs if isinstance(client_prefs, dict) else {}
            extra["provider"] = {**base, **opts.provider_preferences}
        if opts.fallback_models:
            extra["models"] = list(opts.fallback_models)
        if opts.route:
            extra["route"] = opts.route
        if opts.transforms is not None:
            extra["transforms"] = list(opts.transforms)
        extra["usage"] = {"include": True}
        return msgspec.structs.replace(request, extra=extra)

    async def chat(self, request: ChatRequest) -> ChatResponse:
        return self._succeeded(await super().chat(request))

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        return self._succeeded(await super().complete(request))

    def _succeeded(self, response: _Answer) -> _Answer:
        """``response``, unless a choice failed: OpenRouter reports a failure after the
        model started with HTTP 200 and ``finish_reason: error`` (an answer that also
        carries an ``error`` is already that error, OpenAICompatClient's; this is for one
        that does not say why)."""
        if any(choice.finish_reason == "error" for choice in response.choices):
            raise UpstreamError(
                "openrouter: the model failed while answering (finish_reason=error)", provider=self.name
            )
        return response

    # --- models and health -----------------------------------------------------------

    async def health(self) -> Health:
        """``GET /key``: ok when the key is accepted and has credit left."""
        started = time.perf_counter()
        try:
            client = await self._ready()
            response = await client.http_client.get(
                f"{client.base_url}/key",
                headers={"authorization": f"Bearer {self.api_key()}"},
                timeout=client.timeout,
            )
        except LLMRouterError as exc:
            return Health(ok=False, detail=exc.message)
        except httpx.HTTPError as exc:
            return Health(ok=False, detail=f"openrouter: {type(exc).__name__}: {exc}")
        latency = (time.perf_counter() - started) * 1000
        if response.status_code >= 400:
            error = error_from_body(
                response.status_code, response.content, response.headers, provider=self.name
            )
            return Health(ok=False, detail=error.message, latency_ms=latency)
        return _key_health(response, latency)

    # --- zero-config ------------------------------------------------------------------

    @classmethod
    async def discover(cls) -> list[ModelGroup]:
        """With ``OPENROUTER_API_KEY`` set: ``openrouter/auto`` plus the ids listed in
        ``LLMROUTER_OPENROUTER_MODELS`` (comma-separated). No network call at start-up;
        any other OpenRouter model is reachable as ``openrouter/<id>`` (direct routing)."""
        if not os.environ.get(API_KEY_ENV):
            return []
        return [_group(model_id) for model_id in _zero_config_models()]

    @classmethod
    def discovery_note(cls) -> str:
        if not os.environ.get(API_KEY_ENV):
            return f"openrouter: {API_KEY_ENV} not set"
        models = ", ".join(_group(m).name for m in _zero_config_models())
        return f"openrouter: {API_KEY_ENV} set: {models} (any model as openrouter/<id>)"


def _zero_config_models() -> list[str]:
    listed = [m.strip() for m in os.environ.get(MODELS_ENV, "").split(",") if m.strip()]
    return ["openrouter/auto", *[m for m in listed if m != "openrouter/auto"]]


def _group(model_id: str) -> ModelGroup:
    name = model_id if model_id.startswith("openrouter/") else f"openrouter/{model_id}"
    aliases = [] if name == model_id else [model_id]
    deployment = Deployment(provider="openrouter", model=model_id, id=f"openrouter/{model_id}")
    return ModelGroup(name=name, deployments=[deployment], aliases=aliases)


def _key_health(response: httpx.Response, latency: float) -> Health:
    try:
        data = response.json().get("data") or {}
    except (ValueError, AttributeError):
        return Health(ok=True, latency_ms=latency)
    remaining = data.get("limit_remaining")
    if isinstance(remaining, int | float) and remaining <= 0:
        error = error_for_status(402, "openrouter: the key's credit limit is used up")
        return Health(ok=False, detail=error.message, latency_ms=latency)
    detail = f"key {data.get('label') or ''}".strip()
    if isinstance(remaining, int | float):
        detail += f", ${remaining:.2f} left"
    return Health(ok=True, detail=detail, latency_ms=latency)
