"""The shared HTTP client for OpenAI-compatible upstreams (vLLM, llama.cpp, TGI, llmrouter, OpenRouter).

One :class:`OpenAICompatClient` per upstream, holding a keep-alive pool: by default the
lean HTTP/1.1 pool of :mod:`llmrouter.http1`, or httpx (``http_client=`` or
``transport=`` injected, or ``LLMROUTER_HTTP_TRANSPORT=httpx``). Requests are encoded once with msgspec;
responses and SSE chunks are decoded straight into :mod:`llmrouter.types` Structs, with a
lenient fallback for servers that bend the schema. Every error leaves this module as a
member of :mod:`llmrouter.errors`, with the provider's name on it::

    non-2xx                          -> error_for_status(status, upstream message, code, Retry-After);
                                        a 3xx (not followed) names its Location
    {"error": ...} SSE event         -> error_for_status(its code, or 502)
    {"error": ...} in a 200 answer   -> the same, when it has no choices or one ends in "error"
    one JSON object for a stream     -> re-chunked as a stream (the server ignored "stream")
    ConnectError / ReadError / ...   -> UpstreamConnectionError
    httpx.TimeoutException           -> UpstreamTimeoutError
    undecodable body or chunk        -> UpstreamError

Timeouts come from :class:`llmrouter.config.Timeouts`: ``connect`` opens the connection,
``first_token`` is the read timeout (until the headers and first chunk arrive, and then
the longest pause allowed between chunks); ``total`` is enforced by the caller (the router).
Streams always ask for ``stream_options.include_usage``; when an upstream reports no usage
anyway, tokens are counted with :mod:`llmrouter.tokens` and ``usage.estimated`` is set.
"""

from __future__ import annotations

import email.utils
import math
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import anyio
import httpx
import msgspec

from llmrouter.aio import on_asyncio
from llmrouter.chunking import chunks_from_response
from llmrouter.config import Timeouts
from llmrouter.context import current_context
from llmrouter.errors import (
    ConfigError,
    LLMRouterError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamTimeoutError,
    error_for_status,
)
from llmrouter.http1 import HEADER_TOKEN, HTTP1Pool, HTTP1Response
from llmrouter.provider import Health
from llmrouter.tokens import count_messages, count_prompt, count_text
from llmrouter.types import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    StreamOptions,
    Usage,
    request_to_wire,
)

__all__ = ["MAX_RETRY_AFTER", "OpenAICompatClient", "SSEDecoder", "error_from_body", "parse_retry_after"]

T = TypeVar("T")
_R = TypeVar("_R", ChatRequest, CompletionRequest)
_A = TypeVar("_A", ChatResponse, CompletionResponse)
_USAGE_ON = StreamOptions(include_usage=True)
_JSON = "application/json"
_generic = msgspec.json.Decoder()
_DRAIN_S = 1.0
_BOM = b"\xef\xbb\xbf"
_DRAIN_MAX_BYTES = 65536


# --- SSE --------------------------------------------------------------------------------------


class SSEDecoder:
    """Incremental ``text/event-stream`` parser yielding each event's ``data`` as bytes.

    Handles ``data:`` lines (joined with newlines when an event has several), comments
    (``:`` lines), ``event:``/``id:``/``retry:`` fields (ignored, except ``event: error``
    which marks the data as an error), CRLF line ends, and a last event without its
    blank line. The hot path is one ``bytes.split`` per network read.

    Until the first event, lines that are no SSE field are kept (:meth:`body`): an
    upstream that ignores ``"stream": true`` answers with one JSON object instead.
    """

    __slots__ = ("_buffer", "_data", "_event", "_other")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._event = b""
        self._other: list[bytes] | None = []

    def body(self) -> bytes:
        """What came before the first event that was not SSE (a JSON answer), else b""."""
        return b"\n".join(self._other or ())

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        """Add bytes; return the completed events as ``(event_name, data)`` pairs."""
        lines = (self._buffer + chunk).split(b"\n")
        self._buffer = lines.pop()
        events: list[tuple[bytes, bytes]] = []
        self._read(lines, events)
        return events

    def finish(self) -> list[tuple[bytes, bytes]]:
        """Flush the last event when the stream ended without a trailing blank line."""
        events: list[tuple[bytes, bytes]] = []
        self._read([self._buffer, b""] if self._buffer else [b""], events)
        self._buffer = b""
        return events

    def _read(self, lines: list[bytes], events: list[tuple[bytes, bytes]]) -> None:
        # One call per network read, not per line: a stream has two lines an event.
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append((self._event, b"\n".join(self._data)))
                    self._data = []
                    self._other = None
                self._event = b""
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event:"):
                self._event = line[6:].strip()
            elif self._other is not None and line.startswith(_BOM):
                self._read([line[3:]], events)  # a byte-order mark opening the stream: dropped
            elif self._other is not None and not line.startswith((b":", b"id:", b"retry:")):
                self._other.append(line)
            # comments (":") and id:/retry: fields carry nothing we use


# --- errors -----------------------------------------------------------------------------------


MAX_RETRY_AFTER = 86400.0
"""The longest wait taken from an upstream (a day); longer ones are cut to it."""


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` (seconds or an HTTP
    date), from 0 to :data:`MAX_RETRY_AFTER`; None when absent or not a number ("inf" and
    "nan" parse as floats, and an infinite wait cannot be written back as a header)."""
    millis = headers.get("retry-after-ms")
    if millis:
        seconds = _seconds(millis, scale=1000)
        if seconds is not None:
            return seconds
    value = headers.get("retry-after")
    if not value:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - time.time()), MAX_RETRY_AFTER)


def _seconds(text: str, scale: float = 1.0) -> float | None:
    try:
        value = float(text) / scale
    except ValueError:
        return None
    return min(max(0.0, value), MAX_RETRY_AFTER) if math.isfinite(value) else None


def _error_fields(payload: Any) -> tuple[str | None, str | None, str | None, Any]:
    """(message, code, param, status hint) from the error shapes servers use."""
    if not isinstance(payload, dict):
        return None, None, None, None
    error = payload.get("error", payload)
    if isinstance(error, str):  # {"error": "text"} (llama.cpp, TGI)
        return error, None, None, payload.get("code")
    if not isinstance(error, dict):
        return None, None, None, None
    # OpenAI {"error": {message, type, code, param}}; vLLM {"object": "error", message, code};
    # FastAPI {"detail": ...}.
    message = error.get("message") or error.get("detail") or payload.get("detail")
    if message is not None and not isinstance(message, str):
        message = msgspec.json.encode(message).decode()
    raw = _wrapped_error(error)
    if raw:
        # A gateway's wrapper around its upstream's error (OpenRouter: "Provider returned
        # error"): the upstream's own words say what went wrong (a context length, say).
        message = f"{message}: {raw}" if message else raw
    code = error.get("code")
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    status_hint = code if isinstance(code, int) else error.get("status")
    code_text = str(code) if code is not None and not isinstance(code, int) else None
    param = error.get("param")
    return message, code_text, param if isinstance(param, str) else None, status_hint


def _wrapped_error(error: dict[str, Any]) -> str | None:
    """The upstream error a gateway passed on in ``error.metadata.raw`` (OpenRouter's
    shape), cut to :data:`_RAW_CHARS`; None when there is none."""
    metadata = error.get("metadata")
    raw = metadata.get("raw") if isinstance(metadata, dict) else None
    if raw is None:
        return None
    if not isinstance(raw, str):
        raw = msgspec.json.encode(raw).decode()
    return raw[:_RAW_CHARS] or None


_RAW_CHARS = 1000


def error_from_body(
    status: int, body: bytes, headers: Mapping[str, str] | None = None, *, provider: str | None = None
) -> LLMRouterError:
    """Translate an upstream error response into the error tree, keeping its message and code."""
    try:
        payload = _generic.decode(body) if body else None
    except msgspec.DecodeError:
        payload = None
    message, code, param, _ = _error_fields(payload)
    if not message:
        message = _text_message(status, body.decode("utf-8", "replace").strip())
    retry_after = parse_retry_after(headers) if headers is not None else None
    return error_for_status(
        status, message, provider=provider, retry_after=retry_after, code=code, param=param
    )


_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _text_message(status: int, text: str) -> str:
    """The message of an error body that is not JSON: its text (500 characters at most),
    or for an HTML page (a proxy's, a load balancer's) its title, not its markup."""
    if not text:
        return f"upstream answered HTTP {status}"
    if not text.startswith("<"):
        return text[:500]
    title = _TITLE.search(text)
    what = " ".join(title.group(1).split())[:200] if title else ""
    return (
        f"upstream answered HTTP {status}: {what}"
        if what
        else f"upstream answered HTTP {status} (an HTML page)"
    )


def _error_from_event(payload: Any, provider: str) -> LLMRouterError:
    message, code, param, hint = _error_fields(payload)
    status = hint if isinstance(hint, int) and 400 <= hint < 600 else 502
    return error_for_status(
        status, message or "upstream reported an error mid-stream", provider=provider, code=code, param=param
    )


@contextmanager
def _translate(provider: str, action: str) -> Iterator[None]:
    """Turn httpx's errors into the tree (LLMRouterErrors pass through)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamTimeoutError(
            f"{provider}: {action} timed out ({type(exc).__name__})", provider=provider
        ) from exc
    except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        raise UpstreamConnectionError(
            f"{provider}: {action} failed: {exc or type(exc).__name__}", provider=provider
        ) from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(
            f"{provider}: {action} failed: {exc or type(exc).__name__}", provider=provider
        ) from exc


# --- the client -------------------------------------------------------------------------------


def normalise_base_url(base_url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a URL with a path is kept as given."""
    base = base_url.rstrip("/")
    if urlsplit(base).path in ("", "/"):
        base += "/v1"
    return base


_C = TypeVar("_C", ChatChunk, CompletionChunk)


def _chat_texts(chunk: ChatChunk, texts: list[str]) -> None:
    """Add the text a chat chunk carries (content, tool-call and function-call pieces), for
    counting usage."""
    for choice in chunk.choices:
        delta = choice.delta
        if delta.content:
            texts.append(delta.content)
        if delta.tool_calls:
            for call in delta.tool_calls:
                if call.function is not None:
                    texts.append((call.function.name or "") + (call.function.arguments or ""))
                if call.custom:
                    texts.append((call.custom.name or "") + (call.custom.input or ""))
        if delta.function_call is not None:
            texts.append((delta.function_call.name or "") + (delta.function_call.arguments or ""))


def _completion_texts(chunk: CompletionChunk, texts: list[str]) -> None:
    texts.extend(choice.text for choice in chunk.choices if choice.text)


TRANSPORT_ENV = "LLMROUTER_HTTP_TRANSPORT"
"""``http1`` (default: :mod:`llmrouter.http1` on asyncio, httpx's pool on trio) or
``httpx`` (httpx's own pool always, e.g. to go through an HTTP proxy)."""

_Response = httpx.Response | HTTP1Response


class OpenAICompatClient:
    """An async client for one OpenAI-compatible upstream.

    Args:
        base_url: the API root, e.g. ``http://gpu-1:8000/v1`` (``/v1`` is added to a bare host).
        provider: the name put on every error (``remote``, ``openrouter``...).
        api_key: sent as ``Authorization: Bearer``.
        headers: extra headers on every request.
        timeouts: connect and first-token (read) timeouts; ``total`` is the caller's.
        http_client: an ``httpx.AsyncClient`` to use instead of the built-in pool (not
            closed by :meth:`aclose`).
        transport: an httpx transport to use instead of the built-in pool (tests:
            ``httpx.MockTransport``).
        max_connections: pool size.
        max_keepalive: idle connections kept open.
        verify: TLS verification (bool or CA bundle path).
        stream_usage: send ``stream_options.include_usage`` (off for servers that reject it).
        refine_error: maps the error of an upstream's error answer to a truer one (an
            upstream whose 404 means "no model here can do what you asked").
    """

    def __init__(
        self,
        base_url: str,
        *,
        provider: str = "openai",
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeouts: Timeouts | None = None,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 256,
        max_keepalive: int = 64,
        verify: bool | str = True,
        stream_usage: bool = True,
        refine_error: Callable[[LLMRouterError], LLMRouterError] | None = None,
    ) -> None:
        self.base_url = normalise_base_url(base_url)
        self.provider = provider
        self.stream_usage = stream_usage
        self._refine_error = refine_error
        timeouts = timeouts or Timeouts()
        self.timeout = httpx.Timeout(
            connect=timeouts.connect,
            read=timeouts.first_token,
            write=timeouts.first_token,
            pool=timeouts.first_token,
        )
        # Names lowercased, as HTTP treats them: a configured "Accept" or "Host" replaces
        # the client's own instead of going out twice (two Host lines are a 400).
        self._headers = {"accept": _JSON, **{name.lower(): value for name, value in (headers or {}).items()}}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._read_timeout = timeouts.first_token
        self._owns_client = http_client is None
        self._timeout_extension = self.timeout.as_dict()
        self._urls: dict[str, httpx.URL] = {}
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_keepalive)
        self._verify = verify
        self._pool: HTTP1Pool | None = None
        if http_client is None and transport is None and os.environ.get(TRANSPORT_ENV) != "httpx":
            self._pool = HTTP1Pool(
                self.base_url,
                max_connections=max_connections,
                max_keepalive=max_keepalive,
                connect_timeout=timeouts.connect,
                pool_timeout=timeouts.first_token,
                verify=verify,
            )
        # With httpx's pool of our own (or an injected transport), requests go straight
        # to the transport (see _send); an injected http_client goes through its send().
        self._transport: httpx.AsyncBaseTransport | None = None
        # httpx sends header values as ASCII; the built-in pool as latin-1.
        _check_headers(self._headers, provider, ascii_only=self._pool is None)
        if http_client is None and self._pool is None:
            self._transport = transport or httpx.AsyncHTTPTransport(
                limits=self._limits, verify=verify, trust_env=False
            )
        self._client = http_client
        if self._transport is not None:
            self._client = httpx.AsyncClient(transport=self._transport, timeout=self.timeout, trust_env=False)

    @property
    def http_client(self) -> httpx.AsyncClient:
        """An httpx client for calls beyond the OpenAI API (built on first use)."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout, limits=self._limits, verify=self._verify, trust_env=False
            )
        return self._client

    async def aclose(self) -> None:
        """Close the pool (only when this object created it). Safe to call twice."""
        if self._pool is not None:
            await self._pool.aclose()
        if self._owns_client and self._client is not None:
            await self._client.aclose()

    # --- requests ---------------------------------------------------------------------

    def _request_headers(self, stream: bool) -> dict[str, str]:
        headers = dict(self._headers)
        headers["content-type"] = _JSON
        if stream:
            headers["accept"] = "text/event-stream"
        ctx = current_context.get()
        if ctx is not None:
            headers["x-request-id"] = ctx.request_id
            if ctx.traceparent:
                headers["traceparent"] = ctx.traceparent
        return headers

    def _encode(self, request: _R, *, model: str | None, stream: bool) -> bytes:
        """The request body, encoded once (unknown client fields put back at top level)."""
        changes: dict[str, Any] = {"stream": stream}
        if model is not None and model != request.model:
            changes["model"] = model
        if stream:
            changes["stream_options"] = _USAGE_ON if self.stream_usage else request.stream_options
        else:
            changes["stream_options"] = None
        wire = msgspec.structs.replace(request, **changes)
        # omit_defaults drops a completion's max_tokens=16 (OpenAI's default), but servers
        # differ (llama.cpp: unlimited), so that one is always spelled out.
        if not wire.extra and not isinstance(wire, CompletionRequest):
            return msgspec.json.encode(wire)
        data = request_to_wire(wire)
        if isinstance(wire, CompletionRequest) and wire.max_tokens is not None:
            data["max_tokens"] = wire.max_tokens
        return msgspec.json.encode(data)

    async def _send(
        self, method: str, path: str, *, body: bytes | None = None, stream: bool = False
    ) -> _Response:
        """Send one request and return the response unread; the caller closes it.

        ``AsyncClient.send`` costs ~80 µs a request in redirect, auth, cookie and hook
        handling that an upstream API call never needs, so with httpx's pool the request
        goes to the transport directly. An injected ``http_client`` goes through its own
        ``send()``, so that its auth, hooks and proxies apply.
        """
        if self._pool is not None and on_asyncio():  # elsewhere (trio): httpx's pool
            return await self._pool.request(
                method, path, self._request_headers(stream), body, read_timeout=self._read_timeout
            )
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(f"{self.base_url}{path}")
        request = httpx.Request(
            method,
            url,
            headers=self._request_headers(stream),
            content=body,
            extensions={"timeout": self._timeout_extension},
        )
        if self._transport is None:
            return await self.http_client.send(request, stream=True)
        response = await self._transport.handle_async_request(request)
        response.request = request
        return response

    async def _read(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, bytes, Mapping[str, str]]:
        with _translate(self.provider, f"{method} {path}"):
            response = await self._send(method, path, body=body)
            try:
                content = await response.aread()
            finally:
                await response.aclose()
        return response.status_code, content, response.headers

    def _error(self, status: int, content: bytes, headers: Mapping[str, str]) -> LLMRouterError:
        if status < 400:  # redirects are not followed: a POST's body would not survive one
            where = headers.get("location") or "nowhere"
            error: LLMRouterError = error_for_status(
                status,
                f"{self.provider}: upstream redirected (HTTP {status}) to {where}; redirects are not "
                "followed: set base_url to where the API is served",
                provider=self.provider,
            )
        else:
            error = error_from_body(status, content, headers, provider=self.provider)
        return error if self._refine_error is None else self._refine_error(error)

    async def _post_json(self, path: str, body: bytes, kind: type[_A]) -> _A:
        status, content, headers = await self._read("POST", path, body)
        if status >= 300:
            raise self._error(status, content, headers)
        answer = self._decode(content, kind, path)
        failed = any(choice.finish_reason == "error" for choice in answer.choices)
        if failed or not answer.choices:
            payload = _generic.decode(content)
            if isinstance(payload, dict) and payload.get("error") is not None:
                # An error answered with HTTP 200 (OpenRouter's, once the model has
                # started: no choices, or one that ends in "error"): its own status and
                # code, as in a stream's error event.
                error = _error_from_event(payload, self.provider)
                raise error if self._refine_error is None else self._refine_error(error)
        if not answer.choices:
            # OpenAI's answers have at least one (n >= 1); passed on, an empty list is an
            # IndexError in every client that reads choices[0].
            raise UpstreamError(f"{self.provider}: {path} answered no choices", provider=self.provider)
        return answer

    def _decode(self, data: bytes, kind: type[T], what: str) -> T:
        try:
            return msgspec.json.decode(data, type=kind)
        except msgspec.ValidationError:
            pass  # schema bent (e.g. a number as a string): try the lenient route below
        except msgspec.DecodeError as exc:
            raise UpstreamError(
                f"{self.provider}: {what} answered invalid JSON: {exc}", provider=self.provider
            ) from exc
        try:
            return msgspec.convert(_generic.decode(data), kind, strict=False)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise UpstreamError(
                f"{self.provider}: {what} answered an unexpected shape: {exc}", provider=self.provider
            ) from exc

    async def chat(self, request: ChatRequest, *, model: str | None = None) -> ChatResponse:
        """``POST /chat/completions``; ``usage`` is always filled (estimated when not reported)."""
        response = await self._post_json(
            "/chat/completions", self._encode(request, model=model, stream=False), ChatResponse
        )
        return _with_usage(response, request, model)

    async def complete(self, request: CompletionRequest, *, model: str | None = None) -> CompletionResponse:
        """``POST /completions`` (legacy prompt API); ``usage`` always filled."""
        response = await self._post_json(
            "/completions", self._encode(request, model=model, stream=False), CompletionResponse
        )
        return _with_usage(response, request, model)

    def _answer_as_chunks(
        self, body: bytes, request: ChatRequest | CompletionRequest, model: str | None, kind: type[_C]
    ) -> list[_C]:
        """A JSON answer to a stream request as the chunks of a stream (usage last)."""
        payload = self._decode(body, dict, "a stream request")
        if payload.get("error") is not None:
            raise _error_from_event(payload, self.provider)
        if not payload.get("choices"):
            raise UpstreamError(
                f"{self.provider}: a stream request was answered no choices", provider=self.provider
            )
        if kind is ChatChunk:
            chat = _with_usage(self._decode(body, ChatResponse, "a stream request"), request, model)
            return cast(list[_C], chunks_from_response(chat))
        completion = _with_usage(self._decode(body, CompletionResponse, "a stream request"), request, model)
        fields = msgspec.structs.asdict(completion)
        return [kind(**{**fields, "usage": None}), kind(**{**fields, "choices": []})]

    def stream(self, request: ChatRequest, *, model: str | None = None) -> AsyncGenerator[ChatChunk, None]:
        """Stream ``/chat/completions``; the last chunk carries ``usage``.

        Closing the generator (``aclose`` or cancellation) closes the upstream response,
        so the upstream sees its connection go away.
        """
        body = self._encode(request, model=model, stream=True)
        return self._stream_with_usage("/chat/completions", body, request, model, ChatChunk, _chat_texts)

    def stream_complete(
        self, request: CompletionRequest, *, model: str | None = None
    ) -> AsyncGenerator[CompletionChunk, None]:
        """Stream ``/completions``; the last chunk carries ``usage``."""
        body = self._encode(request, model=model, stream=True)
        return self._stream_with_usage(
            "/completions", body, request, model, CompletionChunk, _completion_texts
        )

    async def _stream_with_usage(
        self,
        path: str,
        body: bytes,
        request: ChatRequest | CompletionRequest,
        model: str | None,
        kind: type[_C],
        add_texts: Callable[[_C, list[str]], None],
    ) -> AsyncGenerator[_C, None]:
        """POST ``body`` and yield each SSE data event decoded as ``kind`` until ``[DONE]``;
        then a usage chunk when the upstream sent none at the end (its own figure if it
        reported one earlier, else counted and marked estimated).

        One generator for both: a second one, around the first, cost every chunk
        another generator step (~1.5k CPU instructions)."""
        decoder = msgspec.json.Decoder(kind)
        sse = SSEDecoder()
        texts: list[str] = []
        last: _C | None = None
        reported: Usage | None = None
        with _translate(self.provider, f"POST {path}"):
            response = await self._send("POST", path, body=body, stream=True)
        try:
            if response.status_code >= 300:
                with _translate(self.provider, f"reading the error of POST {path}"):
                    content = await response.aread()
                raise self._error(response.status_code, content, response.headers)
            with _translate(self.provider, f"streaming POST {path}"):
                body_pieces = response.aiter_bytes()
                ended = done = False
                while not ended:
                    try:
                        events = sse.feed(await body_pieces.__anext__())
                    except StopAsyncIteration:
                        events, ended = sse.finish(), True
                    for event, data in events:
                        if data == b"[DONE]":
                            if not ended:
                                await _drain(body_pieces)
                            ended = done = True
                            break
                        chunk = self._chunk(decoder, event, data, kind)
                        add_texts(chunk, texts)
                        if chunk.usage is not None:
                            reported = chunk.usage
                        last = chunk
                        yield chunk
        finally:
            # Runs on normal end, error, aclose() and cancellation alike: an unread body
            # means httpx drops the connection instead of pooling it, so the upstream stops.
            await response.aclose()
        if last is None:
            body = sse.body()
            if not body.lstrip().startswith(b"{"):
                raise UpstreamError(
                    f"{self.provider}: the upstream stream ended without a chunk", provider=self.provider
                )
            # It ignored "stream": true and answered one JSON object: sent on as chunks.
            for chunk in self._answer_as_chunks(body, request, model, kind):
                yield chunk
            return
        if not done and last.usage is None and not any(choice.finish_reason for choice in last.choices):
            # Servers that leave out [DONE] still end with a finish_reason (or usage):
            # without either, the connection closed mid-answer.
            raise UpstreamConnectionError(
                f"{self.provider}: the upstream stream ended mid-answer (no finish_reason, no [DONE])",
                provider=self.provider,
            )
        if last.usage is None:
            usage = reported or _estimate(request, "".join(texts), model)
            yield kind(
                id=last.id,
                created=last.created,
                model=last.model,
                choices=[],
                usage=usage,
                system_fingerprint=last.system_fingerprint,
                service_tier=last.service_tier,
            )

    def _chunk(self, decoder: msgspec.json.Decoder[T], event: bytes, data: bytes, kind: type[T]) -> T:
        if event == b"error" or b'"error"' in data:
            try:
                payload = _generic.decode(data)
            except msgspec.DecodeError:
                payload = {"error": {"message": data.decode("utf-8", "replace")[:500]}}
            if event == b"error" or (isinstance(payload, dict) and payload.get("error") is not None):
                raise _error_from_event(payload, self.provider)
        try:
            return decoder.decode(data)
        except msgspec.ValidationError:
            return self._decode(data, kind, "a stream chunk")
        except msgspec.DecodeError as exc:
            raise UpstreamError(
                f"{self.provider}: the upstream sent an invalid stream chunk: {exc}", provider=self.provider
            ) from exc

    # --- models and health --------------------------------------------------------------

    async def list_models(self) -> list[ModelCard]:
        """``GET /models``, tolerant of missing or null fields."""
        status, content, headers = await self._read("GET", "/models")
        if status >= 300:
            raise self._error(status, content, headers)
        try:
            payload = _generic.decode(content)
        except msgspec.DecodeError as exc:
            raise UpstreamError(
                f"{self.provider}: GET /models answered invalid JSON", provider=self.provider
            ) from exc
        items = payload.get("data") if isinstance(payload, dict) else payload
        cards = []
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                created = item.get("created")
                cards.append(
                    ModelCard(
                        id=item["id"],
                        created=created if isinstance(created, int) else 0,
                        owned_by=str(item.get("owned_by") or self.provider),
                    )
                )
        return cards

    async def health(self) -> Health:
        """Healthy when ``GET /models`` answers; ``latency_ms`` is how long it took."""
        started = time.perf_counter()
        try:
            models = await self.list_models()
        except LLMRouterError as exc:
            return Health(ok=False, detail=exc.message, latency_ms=(time.perf_counter() - started) * 1000)
        latency = (time.perf_counter() - started) * 1000
        return Health(ok=True, detail=f"{len(models)} model(s) at {self.base_url}", latency_ms=latency)


def _check_headers(headers: Mapping[str, str], provider: str, *, ascii_only: bool) -> None:
    """Refuse, at construction, a header that would fail every request (as a retryable
    error, cooling the deployment down) instead: a name that is not an HTTP token, a value
    with a line break or NUL, or characters the transport cannot write (latin-1 for the
    built-in pool, ASCII for httpx)."""
    charset = "ascii" if ascii_only else "latin-1"
    for name, value in headers.items():
        if not HEADER_TOKEN.fullmatch(name):
            raise ConfigError(
                f"{provider}: {name!r} is not a header name (letters, digits and !#$%&'*+-.^_`|~)"
            )
        try:
            value.encode(charset)
        except UnicodeEncodeError:
            raise ConfigError(
                f"{provider}: header {name!r} holds characters this HTTP client cannot send "
                f"(only {charset}); percent-encode the value"
            ) from None
        if "\r" in value or "\n" in value or "\x00" in value:
            raise ConfigError(f"{provider}: header {name!r} holds a line break or NUL")


async def _drain(body_pieces: AsyncIterator[bytes]) -> None:
    """Read what follows ``[DONE]`` (normally just the end of the chunked body), so that the
    connection goes back to the pool instead of being closed: a new TCP connection per
    stream halves throughput. A server that keeps talking is cut off after a moment; one
    that drops the connection here has answered in full (the connection is not reused)."""
    with anyio.move_on_after(_DRAIN_S), suppress(httpx.TransportError):
        received = 0
        async for piece in body_pieces:
            received += len(piece)
            if received > _DRAIN_MAX_BYTES:
                return


def _with_usage(answer: _A, request: ChatRequest | CompletionRequest, model: str | None) -> _A:
    """``answer`` with its usage, counted (and marked estimated) when it reported none."""
    if answer.usage is not None:
        return answer
    if isinstance(answer, ChatResponse):
        text = "".join(_message_text(c.message) for c in answer.choices)
    else:
        text = "".join(c.text for c in answer.choices)
    return msgspec.structs.replace(answer, usage=_estimate(request, text, model))


def _message_text(message: Any) -> str:
    """The text of an answer's message that its completion tokens are counted in."""
    content = message.content
    text = content if isinstance(content, str) else ""
    for call in message.tool_calls or ():
        # A custom call's .function is an empty placeholder: its text is .custom's.
        text += call.function.name + call.function.arguments
        if call.custom is not None:
            text += call.custom.name + call.custom.input
    if message.function_call is not None:
        text += message.function_call.name + message.function_call.arguments
    return text


def _estimate(request: ChatRequest | CompletionRequest, text: str, model: str | None) -> Usage:
    """Usage counted locally (tiktoken family of the model), marked ``estimated``."""
    name = model or request.model
    if isinstance(request, ChatRequest):
        prompt = count_messages(request.messages, name)
    else:
        prompt = count_prompt(request.prompt, name)
    completion = count_text(text, name)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion, estimated=True
    )
