"""A lean HTTP/1.1 client for one upstream: a keep-alive pool on asyncio protocols.

An upstream API call needs little of a general HTTP client: one origin, ``GET`` or a
``POST`` with a byte body, no redirects, cookies, proxies or compression. On the
gateway benchmark a request through httpx on aiohttp's pool cost ~180 µs of CPU, and
through aiohttp alone ~100 µs; this pool, with httptools' parser (uvicorn's), ~35 µs
(``python benchmarks/http_clients.py``; docs/benchmarks.md).

What it does: plain TCP or TLS (``verify``: True, False or a CA bundle), one request per
connection at a time, informational (1xx) answers skipped, idle connections reused most-
recent-first and dropped after ``keepalive_expiry`` or when the server closed them,
``Content-Length``, chunked and close-delimited bodies, back-pressure (reading pauses
while 256 KiB are unread), a connect timeout, and a read timeout for the response head
and for each pause between body pieces. A request whose reused connection closes
before any byte of an answer, within two of the connection's round trips (as its opening
took) and ``_IDLE_RACE_S`` of the send, is sent again once on a new connection: the server
closed it as idle (its keep-alive timeout) as the request left, so it never worked on it.
A later loss is the caller's to retry (a ``POST`` the server read and worked on must not
run twice unseen). Closing a response before its end closes the connection: that
is how a cancelled stream reaches the upstream.

Errors are httpx's classes (``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``,
``PoolTimeout``, ``RemoteProtocolError``, ``ReadError``, ``LocalProtocolError``), so that
callers handle one error set whichever client is in use. asyncio only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import httptools
import httpx

__all__ = ["HEADER_TOKEN", "HTTP1Pool", "HTTP1Response"]

_PAUSE_ABOVE = 256 * 1024
_RESUME_BELOW = 64 * 1024
HEADER_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An HTTP token (RFC 9110): what a header name must be."""
_CHECKED_NAMES: set[str] = set()
"""Header names already found valid: a request sends the same few names each time, and
a set lookup costs a tenth of the regular expression."""
_CHECKED_NAMES_MAX = 1024
_METHODS = frozenset({"GET", "POST"})
# How soon after the send a reused connection's loss is the idle-close race: the server's
# close crossing the request arrives within a round trip (two of them allowed, as the
# connection's opening measured them, plus this margin); working on a request takes longer.
_IDLE_RACE_S = 0.1


class _Connection(asyncio.Protocol):
    """One TCP connection and the response being read from it (one at a time)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.round_trip = 0.0  # how long opening it took (connect, and TLS's handshake)
        self.lost_at: float | None = None  # time.monotonic() when the connection closed
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[bool] | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.received = False
        self._in_flight = False
        self._head_done = False
        self._framed = False  # Content-Length or chunked: the end is known without EOF
        self._complete = False
        self._keep_alive = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._error: Exception | None = None

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self._in_flight or self._complete:  # a server talking out of turn: not reusable
            self.close()
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"invalid HTTP response: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # let the transport close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost_at = time.monotonic()
        if not self._in_flight or self._complete:
            return
        if self._head_done and not self._framed and exc is None:
            self._complete = True  # a close-delimited body ends here
            self._wake()
        elif exc is None:
            self._fail(httpx.RemoteProtocolError("server disconnected without finishing the response"))
        else:
            self._fail(httpx.ReadError(f"connection lost: {exc}"))

    def pause_writing(self) -> None:  # request bodies are small; nothing to throttle
        pass

    def resume_writing(self) -> None:
        pass

    # --- httptools callbacks ----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if 100 <= self.status < 200:  # informational (103 Early Hints...): the answer follows
            self.raw_headers = []
            return
        self._head_done = True
        for name, value in self.raw_headers:
            lower = name.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
                self._framed = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_ABOVE and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self._head_done:  # the end of an informational response
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        self._wake()

    # --- used by the pool and the response --------------------------------------------

    def send(self, data: bytes) -> None:
        self._reset()
        if self.closed or self.transport is None or self.transport.is_closing():
            raise httpx.RemoteProtocolError("the connection was closed")
        self._in_flight = True
        self.transport.write(data)

    async def head(self, read_timeout: float | None) -> None:
        """Wait for the status line and headers."""
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait(read_timeout, "waiting for the response headers")

    async def next_piece(self, read_timeout: float | None) -> bytes:
        """The next piece of the body; ``b""`` at its end."""
        while True:
            if self._chunks:
                piece = self._chunks.popleft()
                self._buffered -= len(piece)
                if self._paused and self._buffered < _RESUME_BELOW and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return piece
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait(read_timeout, "waiting for the response body")

    @property
    def reusable(self) -> bool:
        return self._complete and self._keep_alive and not self.closed and not self._chunks

    def done(self) -> None:
        self._in_flight = False

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def _wait(self, read_timeout: float | None, what: str) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(read_timeout, _expire, waiter) if read_timeout is not None else None
        try:
            timed_out = await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if timed_out:
            raise httpx.ReadTimeout(f"read timed out after {read_timeout:g}s {what}")

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._wake()


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(True)


class HTTP1Response:
    """An answer whose body is read on demand; the same names as ``httpx.Response``."""

    __slots__ = ("_closed", "_conn", "_headers", "_pool", "_timeout", "status_code")

    def __init__(self, pool: HTTP1Pool, conn: _Connection, timeout: float | None) -> None:
        self._pool = pool
        self._conn = conn
        self._timeout = timeout
        self._headers: dict[str, str] | None = None
        self._closed = False
        self.status_code = conn.status

    @property
    def headers(self) -> Mapping[str, str]:
        """Lower-cased names; a repeated header keeps its last value."""
        if self._headers is None:
            self._headers = {
                name.decode("latin-1").lower(): value.decode("latin-1")
                for name, value in self._conn.raw_headers
            }
        return self._headers

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        while piece := await self._conn.next_piece(self._timeout):
            yield piece

    async def aread(self) -> bytes:
        return b"".join([piece async for piece in self.aiter_bytes()])

    async def aclose(self) -> None:
        """Give the connection back (body read to its end) or close it (unread body)."""
        if not self._closed:
            self._closed = True
            self._pool._release(self._conn)


class HTTP1Pool:
    """Keep-alive connections to one origin (``scheme://host:port`` of ``base_url``).

    Args:
        base_url: the origin, and a path prefix for every request (``http://h:8000/v1``).
        max_connections: requests in flight at once; more wait up to ``pool_timeout``.
        max_keepalive: idle connections kept open.
        keepalive_expiry: seconds an idle connection is kept (under uvicorn's and vLLM's
            5 s keep-alive, so that the server seldom closes one as it is reused).
        connect_timeout: seconds to open a connection (TLS handshake included).
        pool_timeout: seconds to wait for a free slot when all are in use.
        verify: TLS verification: True, False, or a CA bundle path.
    """

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 256,
        max_keepalive: int = 64,
        keepalive_expiry: float = 4.0,
        connect_timeout: float | None = 5.0,
        pool_timeout: float | None = None,
        verify: bool | str = True,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._authority = parts.netloc.rpartition("@")[2]
        self._prefix = parts.path.rstrip("/")
        self._verify = verify
        self._ssl: ssl.SSLContext | None = None
        self._max_connections = max_connections
        self._max_keepalive = max_keepalive
        self._keepalive_expiry = keepalive_expiry
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        self._idle: deque[_Connection] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_use = 0  # requests holding a slot (at most max_connections)
        self._queue: deque[asyncio.Future[None]] = deque()  # waiting for a slot, first come first served

    async def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        read_timeout: float | None = None,
    ) -> HTTP1Response:
        """Send a request (``GET`` or ``POST``; ``headers`` named in lowercase, a ``host``
        among them replacing the pool's own) and return once its headers arrived; the
        caller closes the response."""
        data = self._encode(method, path, headers, body)
        self._check_loop()
        await self._acquire()
        try:
            for attempt in (1, 2):
                # The second attempt on a new connection: idle ones the server closed tend
                # to go together (its keep-alive timeout, a NAT dropping idle sockets).
                conn = (self._take_idle() if attempt == 1 else None) or await self._connect()
                sent = time.monotonic()
                try:
                    conn.send(data)
                    await conn.head(read_timeout)
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    conn.close()
                    if attempt == 1 and conn.reused and not conn.received and _idle_race(conn, sent):
                        continue  # closed by the server as idle: it never worked on this request
                    raise
                except BaseException:
                    conn.close()  # timed out or cancelled: the upstream sees the connection go
                    raise
                return HTTP1Response(self, conn, read_timeout)
            raise AssertionError("unreachable")  # pragma: no cover
        except BaseException:
            self._free_slot()
            raise

    async def aclose(self) -> None:
        """Close the idle connections (those in use close when their responses do)."""
        while self._idle:
            self._idle.pop().close()

    # --- internals --------------------------------------------------------------------

    def _encode(self, method: str, path: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
        if method not in _METHODS:
            # A HEAD answer announces a length it does not send: the parser would wait for it.
            raise ValueError(f"HTTP1Pool sends GET and POST, not {method!r}")
        lines = [f"{method} {self._prefix}{path} HTTP/1.1\r\n"]
        if "host" not in headers:  # a configured one (a virtual host) replaces it
            lines.append(f"host: {self._authority}\r\n")
        for name, value in headers.items():
            # Three substring tests cost a sixth of a regular expression's search.
            if (name not in _CHECKED_NAMES and not _valid_name(name)) or (
                "\r" in value or "\n" in value or "\x00" in value
            ):
                raise httpx.LocalProtocolError(f"invalid header {name!r}: {value!r}")
            lines.append(f"{name}: {value}\r\n")
        if body is not None:
            lines.append(f"content-length: {len(body)}\r\n")
        lines.append("\r\n")
        try:
            head = "".join(lines).encode("latin-1")
        except UnicodeEncodeError as exc:
            raise httpx.LocalProtocolError(f"a header is not latin-1: {exc}") from exc
        return head + body if body else head

    def _check_loop(self) -> None:
        """Connections belong to the loop that opened them; a new loop starts afresh."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is not None:
                for conn in self._idle:
                    with contextlib.suppress(RuntimeError):  # their loop may be closed
                        conn.close()
                self._idle.clear()
                self._in_use, self._queue = 0, deque()
            self._loop = loop

    async def _acquire(self) -> None:
        """Take a slot, waiting (up to ``pool_timeout``) when all are in use.

        A counter and a queue rather than ``asyncio.Semaphore``, whose ``locked()``
        walks its waiters on every call."""
        if self._in_use < self._max_connections:
            self._in_use += 1
            return
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._queue.append(waiter)
        try:
            async with asyncio.timeout(self._pool_timeout):
                await waiter  # _free_slot hands its slot over: _in_use stays as it is
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._free_slot()  # handed over just as we gave up: pass it on
            waiter.cancel()  # (a no-op when done) _free_slot skips it in the queue
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout(f"no free connection within {self._pool_timeout:g}s") from exc
            raise

    def _free_slot(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_use -= 1

    def _take_idle(self) -> _Connection | None:
        assert self._loop is not None
        now = self._loop.time()
        while self._idle:
            conn = self._idle.pop()
            if (
                conn.closed
                or conn.transport is None
                or conn.transport.is_closing()
                or (now - conn.idle_since > self._keepalive_expiry)
            ):
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if self._tls else None
        began = time.monotonic()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection, self._host, self._port, ssl=tls, server_hostname=self._host if tls else None
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {self._authority} timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {self._authority}: {exc}") from exc
        conn.round_trip = time.monotonic() - began
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            if self._verify is False:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            else:
                cafile = self._verify if isinstance(self._verify, str) else None
                context = ssl.create_default_context(cafile=cafile)
            context.set_alpn_protocols(["http/1.1"])
            self._ssl = context
        return self._ssl

    def _release(self, conn: _Connection) -> None:
        self._free_slot()
        conn.done()
        if conn.reusable and len(self._idle) < self._max_keepalive and self._loop is not None:
            conn.idle_since = self._loop.time()
            self._idle.append(conn)
        else:
            conn.close()


def _idle_race(conn: _Connection, sent: float) -> bool:
    """Whether ``conn`` (reused, closed before any byte of an answer) was lost soon
    enough after the request ``sent`` (``time.monotonic()``) for the server's idle close to
    have crossed it: timed when the loss arrived, not when this task next ran."""
    lost = conn.lost_at if conn.lost_at is not None else time.monotonic()
    return lost - sent < _IDLE_RACE_S + 2 * conn.round_trip


def _valid_name(name: str) -> bool:
    """``name`` is an HTTP token (RFC 9110), so it cannot end the header line early."""
    if HEADER_TOKEN.fullmatch(name) is None:
        return False
    if len(_CHECKED_NAMES) < _CHECKED_NAMES_MAX:
        _CHECKED_NAMES.add(name)
    return True
