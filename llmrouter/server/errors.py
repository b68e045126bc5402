"""Every failure leaves the service as an OpenAI-style error body.

``{"error": {"message", "type", "code", "param"}}`` with the matching HTTP status, for
llmrouter's own errors, for Litestar's (unknown route 404, 405, 413 body too large,
400 validation) and for anything unexpected (a generic 500, logged with the request
id, never a stack trace in the body). An error of a request that was tried on a
deployment carries the routing headers an answer carries (its model group, and
``X-LLMRouter-Attempts`` after retries).
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from llmrouter.errors import LLMRouterError, NestedTooDeeplyError
from llmrouter.ids import REQUEST_ID_KEY, request_id_of
from llmrouter.server.responses import encoded
from llmrouter.server.state import context_of, response_headers

__all__ = ["error_body", "error_event", "exception_handlers", "openai_error_response"]

logger = logging.getLogger("llmrouter.server")

_encode = msgspec.json.Encoder().encode

# Litestar's HTTP exceptions carry only a status; give each an OpenAI-style type and code.
_HTTP_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def openai_error_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response[bytes]:
    return Response(
        content=_encode(body), status_code=status, media_type="application/json", headers=headers or {}
    )


def _request_id(request: Request[Any, Any, Any]) -> str | None:
    return request.scope.get(REQUEST_ID_KEY)  # type: ignore[return-value]


def _unrouted_id(request: Request[Any, Any, Any]) -> dict[str, str]:
    """``X-Request-ID`` for an error no route's middleware saw (404 and 405 from the
    router: ``RequestIdMiddleware`` runs per route, and gives every routed answer its id)."""
    if REQUEST_ID_KEY in request.scope:
        return {}
    return {"x-request-id": request_id_of(request.scope)}


def _routing_headers(request: Request[Any, Any, Any]) -> dict[str, str]:
    """The headers an answer to the request would carry (its cost aside: an error is no
    answer), from its context, once a deployment was tried: before, its model group may
    still be the client's own text (an unknown model, a newline in it). Latin-1, as an
    answer's are (a model group named in Chinese goes percent-encoded): Litestar's
    encoding would fail."""
    ctx = context_of(request.scope)
    if ctx is None or not ctx.attempts:
        return {}
    return {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in encoded(response_headers(ctx, with_cost=False))
    }


def handle_llmrouter_error(request: Request[Any, Any, Any], exc: LLMRouterError) -> Response[bytes]:
    if exc.http_status >= 500:
        # Upstream/server failures are worth a log line; client mistakes are not.
        logger.warning("request %s failed: %s (%s)", _request_id(request), exc.message, type(exc).__name__)
    return openai_error_response(
        exc.http_status, exc.to_body(), {**_routing_headers(request), **exc.headers()}
    )


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    type_, code = _HTTP_TYPES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    message = exc.detail or "error"
    param = None
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        if isinstance(first, dict):
            param = first.get("key")
            message = f"{message}: {first.get('message', '')}".rstrip(": ")
    if status == 404 and message == "Not Found":
        message = f"no route for {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    elif status == 413:
        message = "request body is too large"
    headers = {**(exc.headers or {}), **_unrouted_id(request)}
    return openai_error_response(status, error_body(message, type_, code, param), headers)


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    logger.error("request %s: unexpected error", _request_id(request), exc_info=exc)
    return openai_error_response(
        HTTP_500_INTERNAL_SERVER_ERROR,
        error_body("internal server error", "server_error", "internal_error"),
        {**_routing_headers(request), **_unrouted_id(request)},
    )


def handle_recursion(request: Request[Any, Any, Any], exc: RecursionError) -> Response[bytes]:
    # JSON the decoder took, nested too deeply for an encoder further down (the cache
    # key's, say): the request's fault wherever it surfaced.
    return handle_llmrouter_error(request, NestedTooDeeplyError())


def error_event(exc: BaseException, request_id: str | None = None) -> bytes:
    """The SSE event that reports a failure after a stream has started."""
    if isinstance(exc, LLMRouterError):
        body = exc.to_body()
        if exc.http_status >= 500:
            logger.warning("stream %s failed: %s (%s)", request_id, exc.message, type(exc).__name__)
    else:
        logger.error("stream %s: unexpected error", request_id, exc_info=exc)
        body = error_body("internal server error", "server_error", "internal_error")
    return b"data: " + _encode(body) + b"\n\n"


exception_handlers: dict[int | type[Exception], Any] = {
    LLMRouterError: handle_llmrouter_error,
    HTTPException: handle_http_exception,
    RecursionError: handle_recursion,
    Exception: handle_unexpected,
}
