"""Translate what the ``ollama`` client and httpx raise into llmrouter's error tree.

::

    ollama.ResponseError 404 "model ... not found"  -> ModelNotFoundError (says: ollama pull <model>)
    ollama.ResponseError 400 "... does not support tools" -> UnsupportedFeatureError
    ollama.ResponseError <status>                   -> error_for_status (429/5xx retryable)
    ollama.ResponseError without status              -> UpstreamError (an {"error": ...} line mid-stream)
    ConnectionError / httpx.ConnectError             -> UpstreamConnectionError (no daemon)
    httpx.TimeoutException                           -> UpstreamTimeoutError
    httpx.RemoteProtocolError / ReadError / ...      -> UpstreamConnectionError (broken stream)
    json / UTF-8 / pydantic errors on a malformed part -> UpstreamError
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from contextvars import ContextVar

import httpx
import ollama
import pydantic

from llmrouter.errors import (
    LLMRouterError,
    ModelNotFoundError,
    UnsupportedFeatureError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamTimeoutError,
    error_for_status,
)
from llmrouter.openai_compat import parse_retry_after

__all__ = ["record_retry_after", "translate_errors"]

PROVIDER = "ollama"

# The ollama client turns an error response into ResponseError and drops its headers;
# an httpx response hook keeps Retry-After here (same task, so the same context).
_retry_after: ContextVar[float | None] = ContextVar("llmrouter_ollama_retry_after", default=None)


async def record_retry_after(response: httpx.Response) -> None:
    """httpx response hook: remember ``Retry-After`` of an error response (read as from
    any upstream: seconds or an HTTP date, finite, at most a day)."""
    _retry_after.set(parse_retry_after(response.headers) if response.status_code >= 400 else None)


def _from_response_error(exc: ollama.ResponseError, model: str, host: str) -> LLMRouterError:
    message = str(exc.error)
    status = exc.status_code
    if status == -1:
        return UpstreamError(f"ollama: {message}", provider=PROVIDER)
    if status == 404 and "not found" in message:
        return ModelNotFoundError(
            f"ollama: model {model!r} is not available on {host}: pull it first (`ollama pull {model}`)",
            provider=PROVIDER,
        )
    if status == 400 and "does not support" in message:
        # "registry.ollama.ai/library/gemma3:4b does not support tools" (or thinking, or
        # insert): this model cannot do what the request asks, another deployment may.
        return UnsupportedFeatureError(f"ollama: {message}", provider=PROVIDER)
    return error_for_status(status, f"ollama: {message}", provider=PROVIDER, retry_after=_retry_after.get())


def translate(exc: BaseException, model: str, host: str) -> LLMRouterError | None:
    """The llmrouter error for ``exc``, or None when it is not an upstream failure."""
    if isinstance(exc, ollama.ResponseError):
        return _from_response_error(exc, model, host)
    if isinstance(exc, ConnectionError | httpx.ConnectError):
        return UpstreamConnectionError(f"ollama: no daemon answering at {host}", provider=PROVIDER)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeoutError(
            f"ollama: timed out talking to {host}: {type(exc).__name__}", provider=PROVIDER
        )
    if isinstance(exc, httpx.TransportError):
        return UpstreamConnectionError(f"ollama: connection to {host} broke: {exc}", provider=PROVIDER)
    if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError | pydantic.ValidationError):
        return UpstreamError(f"ollama: malformed response part: {exc}", provider=PROVIDER)
    return None


@contextlib.asynccontextmanager
async def translate_errors(model: str, host: str) -> AsyncIterator[None]:
    """Re-raise client and transport errors as llmrouter errors (``from`` the original)."""
    try:
        yield
    except LLMRouterError:
        raise
    except Exception as exc:
        translated = translate(exc, model, host)
        if translated is None:
            raise
        raise translated from exc
