"""One exception tree for llmrouter; every error knows its HTTP status and OpenAI body.

::

    LLMRouterError (500 server_error)
    ├── ConfigError                       bad configuration (raised at start-up)
    ├── ProviderNotInstalledError         a known provider whose distribution is missing
    ├── InvalidRequestError (400)
    │   ├── ContextWindowExceededError    code=context_length_exceeded
    │   └── UnsupportedFeatureError       the deployment cannot do what was asked
    ├── AuthenticationError (401)
    ├── InsufficientCreditsError (402)    upstream account out of credit
    ├── PermissionDeniedError (403)
    ├── NotFoundError (404)
    │   └── ModelNotFoundError            code=model_not_found
    ├── RequestTooLargeError (413)
    ├── UnprocessableEntityError (422)
    ├── RateLimitError (429)              retry_after in seconds
    │   └── BudgetExceededError           code=insufficient_quota
    ├── UpstreamError (502, retryable)    a provider failed (an upstream 4xx not above: not retryable)
    │   ├── UpstreamRefusedDeploymentError  the upstream refused the deployment itself
    │   │   ├── UpstreamAuthenticationError  its credentials (its 401)
    │   │   └── UpstreamModelNotFoundError   its model
    │   ├── UpstreamConnectionError       connect refused / reset
    │   ├── UpstreamTimeoutError (504)    connect, first-token or total timeout
    │   └── UpstreamUnavailableError (503)
    └── NoDeploymentAvailableError (503)  every deployment cooling down or full

Providers translate their library's errors at the boundary (``raise X(...) from exc``).
``retryable`` tells the router whether another attempt may succeed; an upstream 429 is
retryable, a local rate limit is not.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar

__all__ = [
    "AccountingUnavailableError",
    "AuthenticationError",
    "BudgetExceededError",
    "ConfigError",
    "ContextWindowExceededError",
    "InsufficientCreditsError",
    "InvalidRequestError",
    "LLMRouterError",
    "ModelNotFoundError",
    "NestedTooDeeplyError",
    "NoDeploymentAvailableError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProviderNotInstalledError",
    "RateLimitError",
    "RequestTooLargeError",
    "ShuttingDownError",
    "UnprocessableEntityError",
    "UnsupportedFeatureError",
    "UpstreamAuthenticationError",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamModelNotFoundError",
    "UpstreamRefusedDeploymentError",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "error_for_status",
    "one_line_cause",
]


class LLMRouterError(Exception):
    """Base of every llmrouter error.

    Args:
        message: human-readable text, safe to show to the client.
        code: OpenAI-style machine code (e.g. ``model_not_found``).
        param: the request field at fault, if any.
        provider: the provider that raised it, if any.
        retry_after: seconds the client should wait before retrying.
        retryable: override the class default for this instance.
        status: override the class default HTTP status (e.g. an upstream's own 4xx).
    """

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        provider: str | None = None,
        retry_after: float | None = None,
        retryable: bool | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.provider = provider
        self.retry_after = retry_after
        self.retryable = self.default_retryable if retryable is None else retryable
        self.http_status = status if status is not None else self.status

    def to_body(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "code", "param"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        # Rounded up: a client that waits the header's seconds must find room then (rounded
        # to the nearest, 119.3 s said 119, and the retry was refused again).
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class ConfigError(LLMRouterError):
    """The configuration is invalid; the message names the bad field's path."""


class ProviderNotInstalledError(LLMRouterError):
    """A known provider was asked for but its distribution is not installed."""


class InvalidRequestError(LLMRouterError):
    status = 400
    type = "invalid_request_error"


class NestedTooDeeplyError(InvalidRequestError):
    """JSON the decoder took but an encoder on the request's path could not: nested just
    under the decoder's limit, it runs out of stack deeper down (``RecursionError``).

    The message is a parameter with a default so that pickle and ``copy`` can rebuild
    it: they call the class with ``args``."""

    def __init__(self, message: str = "request body is nested too deeply") -> None:
        super().__init__(message)


class ContextWindowExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class UnsupportedFeatureError(InvalidRequestError):
    default_code = "unsupported_feature"


class AuthenticationError(LLMRouterError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class InsufficientCreditsError(LLMRouterError):
    status = 402
    type = "insufficient_quota"
    default_code = "insufficient_credits"


class PermissionDeniedError(LLMRouterError):
    status = 403
    type = "permission_error"


class NotFoundError(LLMRouterError):
    status = 404
    type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    type = "invalid_request_error"
    default_code = "model_not_found"


class RequestTooLargeError(LLMRouterError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class UnprocessableEntityError(LLMRouterError):
    status = 422
    type = "invalid_request_error"


class RateLimitError(LLMRouterError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class BudgetExceededError(RateLimitError):
    """A budget refused the request. ``until_reset``: what is spent already leaves no
    room for it, so trying again before the budget's period resets cannot succeed; the
    response then says ``x-should-retry: false``, which the OpenAI SDKs obey (a refusal
    only for other requests' reservations may pass once they settle)."""

    type = "insufficient_quota"
    default_code = "insufficient_quota"

    def __init__(self, message: str, *, until_reset: bool = False, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.until_reset = until_reset

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        if self.until_reset:
            headers["x-should-retry"] = "false"
        return headers


class UpstreamError(LLMRouterError):
    status = 502
    type = "upstream_error"
    default_retryable = True


class UpstreamRefusedDeploymentError(UpstreamError):
    """An upstream refused the deployment itself, whatever the request: not what the
    caller could fix, but the deployment's config. The request moves on to the next
    deployment, the failure counts against this one, and the answer says
    ``x-should-retry: false`` (an SDK retrying it would only meet the same refusal)."""

    default_retryable = False

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "x-should-retry": "false"}


class UpstreamAuthenticationError(UpstreamRefusedDeploymentError):
    """An upstream refused the credentials configured for a deployment (its 401)."""

    default_code = "upstream_authentication_failed"


class UpstreamModelNotFoundError(UpstreamRefusedDeploymentError):
    """An upstream does not have the model a deployment names (retired, or misspelt in
    the config). Not the caller's ``model_not_found``: the caller named a group the router
    has. ``model``: the id the upstream does not have (a deployment may send several:
    its model, and fallbacks)."""

    default_code = "upstream_model_not_found"

    def __init__(self, message: str, *, model: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.model = model


class UpstreamConnectionError(UpstreamError):
    default_code = "upstream_connection_error"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    default_code = "upstream_timeout"


class UpstreamUnavailableError(UpstreamError):
    status = 503
    default_code = "upstream_unavailable"


class NoDeploymentAvailableError(LLMRouterError):
    status = 503
    type = "service_unavailable"
    default_code = "no_deployment_available"


class ShuttingDownError(LLMRouterError):
    """The service cut the request short to shut down (``server.drain_seconds`` ran out).

    The message is a parameter with a default so that pickle and ``copy`` can rebuild
    it: they call the class with ``args``."""

    status = 503
    type = "service_unavailable"
    default_code = "server_shutting_down"

    def __init__(self, message: str = "the server is shutting down; send the request again") -> None:
        super().__init__(message, retry_after=1.0)


class AccountingUnavailableError(LLMRouterError):
    """The store of limits or budgets (Redis, the database) failed: the request cannot be
    admitted safely now, and may be retried."""

    status = 503
    type = "service_unavailable"
    default_code = "accounting_unavailable"


# Servers that say so only in words: vLLM ("This model's maximum context length is 4096
# tokens ...", code 400), llama.cpp ("request (4476 tokens) exceeds the available context
# size (4096 tokens)"), and, as a gateway (OpenRouter) passes their errors on, Anthropic
# ("prompt is too long: 208415 tokens > 200000 maximum"; "input length and `max_tokens`
# exceed context limit: 178959 + 64000 > 200000", as vLLM's "(8000 > 4096 - 2778)") and
# Google ("The input token count (1200000) exceeds the maximum number of tokens allowed
# (1048576)", also without the first count; Vertex: "the input token count is 1251952 but
# model only supports up to 1048576"). Not a max_tokens alone above the model's output
# limit ("max_tokens: 300000 > 64000, which is the maximum allowed number of output
# tokens"): that is the client's to fix, on every deployment.
_CONTEXT_TOO_SMALL = re.compile(
    r"maximum context length|exceeds the available context size"
    r"|prompt is too long: \d+ tokens > \d+ maximum"
    r"|input length and .?max_tokens.? exceed context limit"
    r"|input token count (?:\(\d+\) )?exceeds the maximum number of tokens allowed"
    r"|input token count is \d+ but model only supports up to \d+",
    re.IGNORECASE,
)


def error_for_status(
    status: int,
    message: str,
    *,
    provider: str | None = None,
    retry_after: float | None = None,
    code: str | None = None,
    param: str | None = None,
) -> LLMRouterError:
    """Translate an upstream HTTP status into the error tree.

    429, 408 and 5xx are retryable; the 4xx named here are not (the same request would
    fail again). Only 400, 413 and 422 say the request itself is bad. Any other status
    (405 from a proxy on a wrong path, 409, 410 Gone, 451...) says nothing about the
    request, only that this deployment cannot answer it: a ``502`` that moves the request
    on to the next deployment and counts toward the cooldown, without trying this one
    again. Passed on as the request's fault, it failed every request at the first
    deployment while a healthy one stood by.
    """
    kwargs: dict[str, Any] = {"provider": provider, "retry_after": retry_after, "code": code, "param": param}
    if status == 400:
        if code == "context_length_exceeded" or _CONTEXT_TOO_SMALL.search(message):
            return ContextWindowExceededError(message, **{**kwargs, "code": None})  # its own code
        if code == "unsupported_feature":  # a remote llmrouter node's refusal: another may take it
            return UnsupportedFeatureError(message, **kwargs)
        return InvalidRequestError(message, **kwargs)
    if status == 401:
        return AuthenticationError(message, **kwargs)
    if status == 402:
        return InsufficientCreditsError(message, **kwargs)
    if status == 403:
        return PermissionDeniedError(message, **kwargs)
    if status == 404:
        return NotFoundError(message, **kwargs)
    if status == 408:
        return UpstreamTimeoutError(message, **kwargs)
    if status == 413:
        return RequestTooLargeError(message, **kwargs)
    if status == 422:
        return UnprocessableEntityError(message, **kwargs)
    if status == 429:
        return RateLimitError(message, retryable=True, **kwargs)
    if status == 503:
        return UpstreamUnavailableError(message, **kwargs)
    if status == 504:
        return UpstreamTimeoutError(message, **kwargs)
    if status >= 500:
        return UpstreamError(message, status=502, **kwargs)
    named = message if f"HTTP {status}" in message else f"{message} (upstream HTTP {status})"
    return UpstreamError(named, status=502, retryable=False, **kwargs)


def one_line_cause(exc: BaseException) -> str:
    """What went wrong, in one line, for a message without a traceback: our own errors'
    words, else the innermost cause (the ``ConnectionRefusedError`` or the database's
    "role does not exist" under SQLAlchemy's and asyncpg's wrappers).

    A cause that is no error (the ``CancelledError`` under a ``TimeoutError``: how the
    timeout was made) is not followed, nor a cause without words under an error with
    some (the bare ``TimeoutError`` under "timed out connecting to ...")."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, LLMRouterError):
        return exc.message
    while isinstance(exc.__cause__, Exception) and (str(exc.__cause__) or not str(exc)):
        exc = exc.__cause__
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
