"""Translate what the ``ollama`` client and httpx raise into llmrouter's error tree.

::

    ollama.ResponseError 404 "model ... not found"  -> ModelNotFoundError (says: ollama pull <model>)
    ollama.ResponseError 404, other words            -> UpstreamError, not retryable: nothing at that URL
    ollama.ResponseError 400 "... does not support tools" -> UnsupportedFeatureError
    ollama.ResponseError <status>                   -> error_for_status (429/5xx retryable)
    ollama.ResponseError without status              -> UpstreamError (an {"error": ...} line mid-stream)
    the client choking on a body not of Ollama's shape -> as its status says, else UpstreamError
    ConnectionError / httpx.ConnectError             -> UpstreamConnectionError (no daemon)
    httpx.TimeoutException                           -> UpstreamTimeoutError
    httpx.RemoteProtocolError / ReadError / ...      -> UpstreamConnectionError (broken stream)
    json / UTF-8 / pydantic errors on a malformed part -> UpstreamError
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from contextvars import ContextVar
from types import TracebackType

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

__all__ = ["record_error_response", "translate_errors"]

PROVIDER = "ollama"

# Ollama's words for a model it does not have: `model "x" not found, try pulling it first`
# (chat, generate) and `model 'x' not found` (show, newer versions). Go's router and
# proxies say `404 page not found` for a path nobody serves.
_MODEL_NOT_FOUND = re.compile(r"^model\b.*\bnot found\b")


# The ollama client turns an error response into ResponseError and drops its headers and
# URL (and fails outright on a body that is not a JSON object); an httpx response hook
# keeps the response here (same task, so the same context).
_error_response: ContextVar[httpx.Response | None] = ContextVar("llmrouter_ollama_error", default=None)


async def record_error_response(response: httpx.Response) -> None:
    """httpx response hook: remember an error response, for its status, URL, ``Retry-After``
    and body; a successful one clears what an earlier one left."""
    _error_response.set(response if response.status_code >= 400 else None)


def _recorded(status: int | None = None) -> httpx.Response | None:
    """The error response the hook kept, if its status is ``status`` (when given)."""
    response = _error_response.get()
    if response is None or (status is not None and response.status_code != status):
        return None
    return response


def _where(response: httpx.Response | None, host: str) -> str:
    if response is None:
        return host
    return str(response.request.url.copy_with(query=None))


def _not_found(message: str, model: str, host: str, response: httpx.Response | None) -> LLMRouterError:
    """A 404 says the model is not pulled only in Ollama's words; any other 404 (a wrong
    path in ``host``, a proxy that serves something else) is this deployment's address
    being wrong, which pulling cannot fix: it fails over without being tried again."""
    if _MODEL_NOT_FOUND.search(message):
        return ModelNotFoundError(
            f"ollama: model {model!r} is not available on {host}: pull it first (`ollama pull {model}`)",
            provider=PROVIDER,
        )
    return UpstreamError(
        f"ollama: nothing at {_where(response, host)}: check `host` (upstream HTTP 404: {message[:200]})",
        status=502,
        retryable=False,
        provider=PROVIDER,
    )


def _from_status(
    status: int, message: str, model: str, host: str, response: httpx.Response | None
) -> LLMRouterError:
    if status == 404:
        return _not_found(message, model, host, response)
    if status == 400 and "does not support" in message:
        # "registry.ollama.ai/library/gemma3:4b does not support tools" (or thinking, or
        # insert): this model cannot do what the request asks, another deployment may.
        return UnsupportedFeatureError(f"ollama: {message}", provider=PROVIDER)
    retry_after = parse_retry_after(response.headers) if response is not None else None
    return error_for_status(status, f"ollama: {message}", provider=PROVIDER, retry_after=retry_after)


def _from_response_error(exc: ollama.ResponseError, model: str, host: str) -> LLMRouterError:
    message = str(exc.error)
    status = exc.status_code
    if status == -1:
        return UpstreamError(f"ollama: {message}", provider=PROVIDER)
    return _from_status(status, message, model, host, _recorded(status))


def _raised_by_client(exc: BaseException) -> bool:
    """True when ``exc`` comes from the ollama client's own code: it calls ``.get`` on an
    error body and ``**`` on an answer, so one that is a JSON string, list, number or
    null fails there with AttributeError or TypeError (a bug of ours would not)."""
    tb: TracebackType | None = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    # By module, not file: compiled or bundled installs keep the paths they were built at.
    return str(tb.tb_frame.f_globals.get("__name__", "")).partition(".")[0] == "ollama"


def _body_text(response: httpx.Response) -> str:
    """What an error body says: the text of a JSON string, else the body as sent."""
    text = response.text.strip()
    with contextlib.suppress(ValueError):
        value = json.loads(text)
        if isinstance(value, str):
            text = value
    return text[:300] or f"HTTP {response.status_code}"


def _from_malformed_body(exc: Exception, model: str, host: str) -> LLMRouterError:
    """An answer the client could not read: an error response keeps its status (a proxy's
    503 stays retryable); a successful one is a malformed response."""
    response = _recorded()
    if response is not None:
        return _from_status(response.status_code, _body_text(response), model, host, response)
    return UpstreamError(f"ollama: malformed response (not of Ollama's shape): {exc}", provider=PROVIDER)


def translate(exc: BaseException, model: str, host: str) -> LLMRouterError | None:
    """The llmrouter error for ``exc``, or None when it is not an upstream failure."""
    if isinstance(exc, ollama.ResponseError):
        return _from_response_error(exc, model, host)
    if isinstance(exc, AttributeError | TypeError) and _raised_by_client(exc):
        return _from_malformed_body(exc, model, host)
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
    _error_response.set(None)  # what an earlier call in this task left is not this call's
    try:
        yield
    except LLMRouterError:
        raise
    except Exception as exc:
        translated = translate(exc, model, host)
        if translated is None:
            raise
        raise translated from exc
