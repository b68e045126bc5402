"""An httpx transport on aiohttp's connection pool.

Providers talk httpx (injectable, ``httpx.MockTransport`` in tests); this transport
only replaces the pool underneath. httpcore's pool walks every connection for each
request (``is_idle``/``has_expired``), which cost about half the gateway's CPU with 64
requests in flight; aiohttp's connector keeps idle connections in a per-host deque.

aiohttp's errors are translated into httpx's (connect refused -> ``ConnectError``,
connect timeout -> ``ConnectTimeout``, read timeout -> ``ReadTimeout``, a dropped
connection -> ``RemoteProtocolError``/``ReadError``), so callers handle one error set.
Closing a response that was not read to the end closes its connection: that is how a
cancelled stream reaches the upstream.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

__all__ = ["AiohttpTransport"]

_DROPPED_HEADERS = frozenset({b"content-length", b"transfer-encoding"})


@contextmanager
def _translated(request: httpx.Request) -> Iterator[None]:
    import aiohttp

    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
    except aiohttp.SocketTimeoutError as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc
    except aiohttp.ServerDisconnectedError as exc:
        raise httpx.RemoteProtocolError(str(exc) or "server disconnected", request=request) from exc
    except aiohttp.ClientPayloadError as exc:
        raise httpx.ReadError(str(exc), request=request) from exc
    except aiohttp.ClientResponseError as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc
    except (aiohttp.ClientOSError, ConnectionError) as exc:
        raise httpx.ReadError(str(exc), request=request) from exc
    except TimeoutError as exc:
        raise httpx.TimeoutException(str(exc) or "timed out", request=request) from exc


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: Any, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _translated(self._request):
            async for data in self._response.content.iter_any():
                yield data

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # back to the pool
        else:
            self._response.close()  # unread body: drop the connection, the upstream sees it


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's transport interface over an ``aiohttp.ClientSession`` (asyncio only).

    Args:
        limits: ``max_connections`` and ``keepalive_expiry`` are honoured.
        verify: TLS verification: True, False, or a CA bundle path.
    """

    def __init__(self, *, limits: httpx.Limits | None = None, verify: bool | str = True) -> None:
        self._limits = limits or httpx.Limits()
        self._verify = verify
        self._session: Any = None

    def _ssl(self) -> ssl.SSLContext | bool:
        if self._verify is True:
            return True
        if self._verify is False:
            return False
        return ssl.create_default_context(cafile=self._verify)

    def _client(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._limits.max_connections or 0,
                keepalive_timeout=self._limits.keepalive_expiry or 5.0,
                ssl=self._ssl(),
            )
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False)
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        import aiohttp

        timeout = request.extensions.get("timeout", {})
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in request.headers.raw
            if k.lower() not in _DROPPED_HEADERS
        ]
        with _translated(request):
            response = await self._client().request(
                request.method,
                str(request.url),
                headers=headers,
                data=request.content or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=timeout.get("connect"), sock_read=timeout.get("read")
                ),
            )
        return httpx.Response(
            response.status,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers],
            stream=_ResponseStream(response, request),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
