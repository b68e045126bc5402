"""A small closed-loop HTTP/1.1 load generator on raw asyncio streams.

Python HTTP clients (httpx in particular) cost more CPU per request than the gateway
under test, so this one only writes pre-encoded requests and parses just enough of the
answer: the status line, ``Content-Length`` or chunked framing, the arrival time of the
first generated text (time to first token for SSE), and an SSE error event ending a
stream after its 200. Each of ``concurrency`` workers keeps one connection alive and
sends its next request when the previous one ended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["LoadResult", "http_request", "run_load", "send_at_once"]


@dataclass
class LoadResult:
    """Latencies (seconds) of the requests that ended inside the measured window, however
    long before it they started: a target whose requests take nearly as long as the
    window (LiteLLM's streams at concurrency 64: ~1 s) would otherwise show a fraction of
    its throughput, only the few requests that both started and ended in it."""

    latencies: list[float] = field(default_factory=list)
    first_content: list[float] = field(default_factory=list)
    """Seconds to the first generated text: the first chunk with a non-empty ``content``
    or ``text`` (a stream), or the body (a JSON answer)."""
    errors: int = 0
    total: int = 0
    """Every response received, warm-up included (for CPU per request)."""
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def completed(self) -> int:
        return len(self.latencies)


_STREAM_ERROR = b'data: {"error"'
"""How an SSE stream reports a failure after its 200 (llmrouter, LiteLLM and OpenAI alike)."""

_CONTENT_MARKERS = (b'"content":"', b'"text":"')
"""Where a chat chunk (``delta.content``) or a completions chunk (``text``) has its text."""


def _carries_content(data: bytes) -> bool:
    """Whether ``data`` (a chunk of an SSE body) carries generated text: a ``content`` or
    ``text`` string that is not empty. Not the first chunk as such: a gateway forwards
    the role-only first chunk (``"content":""``) at once, long before the first token,
    and would look instant (what the provider bench's ``stream_sample`` counts too)."""
    for marker in _CONTENT_MARKERS:
        at = data.find(marker)
        while at != -1:
            at += len(marker)
            if data[at : at + 1] not in (b'"', b""):
                return True
            at = data.find(marker, at)
    return False


class _Answer(NamedTuple):
    status: int
    first_content: float | None
    """When the first generated text arrived (None: none did)."""
    failed: bool
    """An SSE error event came after the 200: a failure the status cannot say any more."""


async def _read_body(reader: asyncio.StreamReader, headers: bytes) -> tuple[float | None, bool]:
    """Consume the body; return when its first generated text arrived (None if none
    did; for a ``Content-Length`` body, when it arrived whole), and whether an SSE error
    event ended it. Only bytes ``in`` tests per chunk: this loop shares the load
    generator's core with every other request's."""
    lower = headers.lower()
    if b"transfer-encoding: chunked" in lower:
        first: float | None = None
        failed = False
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return first, failed
            data = await reader.readexactly(size + 2)
            if first is None and _carries_content(data):
                first = time.perf_counter()
            if _STREAM_ERROR in data:
                failed = True
    marker = lower.find(b"content-length:")
    if marker == -1:
        return None, False
    length = int(lower[marker + 15 : lower.index(b"\r\n", marker)])
    if length:
        await reader.readexactly(length)
        return time.perf_counter(), False
    return None, False


_DROPPED = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)
"""What a request whose connection failed, or was closed mid-answer, raises."""


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> _Answer:
    """Send one request and read its whole answer. Raises one of :data:`_DROPPED`."""
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    return _Answer(int(head[9:12]), *await _read_body(reader, head))


async def _worker(
    host: str,
    port: int,
    make_request: Callable[[int], bytes],
    window: _Window,
    result: LoadResult,
    counter: list[int],
) -> None:
    """:func:`_closed_loop` until ``window.give_up`` at the latest: a target that stops
    answering (stuck, or a connection left open without an answer) must not hang the
    bench. The request then in flight is an error, its connection is closed (the loop's
    ``finally``), and this worker stops. One timer for the worker's whole run, not one
    per request: the loop stays as cheap as it was."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(loop.time() + window.give_up - time.perf_counter()):
            await _closed_loop(host, port, make_request, window, result, counter)
    except TimeoutError:
        result.total += 1
        result.errors += 1


async def _closed_loop(
    host: str,
    port: int,
    make_request: Callable[[int], bytes],
    window: _Window,
    result: LoadResult,
    counter: list[int],
) -> None:
    measure_from, deadline = window.measure_from, window.deadline
    connection = await _connect(host, port, deadline, measure_from, result)
    if connection is None:
        return
    reader, writer = connection
    try:
        while time.perf_counter() < deadline:
            counter[0] += 1
            payload = make_request(counter[0])
            started = time.perf_counter()
            try:
                answer = await _exchange(reader, writer, payload)
            except _DROPPED:
                # A request the connection dropped: counted as a request (the server
                # worked on it), and as an error when it ended in the window, as a
                # status of 400 and above is.
                result.total += 1
                if measure_from <= time.perf_counter() <= deadline:
                    result.errors += 1
                writer.close()
                connection = await _connect(host, port, deadline, measure_from, result)
                if connection is None:
                    return
                reader, writer = connection
                continue
            ended = time.perf_counter()
            result.total += 1
            if not measure_from <= ended <= deadline:
                continue
            result.statuses[answer.status] = result.statuses.get(answer.status, 0) + 1
            if answer.status >= 400 or answer.failed:
                # A stream that ended with an error event: no answer, however quick.
                result.errors += 1
                continue
            result.latencies.append(ended - started)
            result.first_content.append((answer.first_content or ended) - started)
    finally:
        writer.close()


async def _connect(
    host: str, port: int, deadline: float, measure_from: float, result: LoadResult
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A connection, tried again every 50 ms until ``deadline`` (None then): a server that
    refuses connections for a while (restarting, or down) is an error of this worker's in
    the window, not the end of the bench. One error for the outage, however many tries:
    the count must not depend on how often one tries."""
    counted = False
    while time.perf_counter() < deadline:
        try:
            return await asyncio.open_connection(host, port)
        except OSError:
            if not counted and time.perf_counter() >= measure_from:
                result.errors += 1
                counted = True
            await asyncio.sleep(0.05)
    return None


def http_request(
    host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None
) -> bytes:
    """An encoded keep-alive ``POST`` request."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Window(NamedTuple):
    """A run's times, on :func:`time.perf_counter`'s clock."""

    measure_from: float
    deadline: float
    """The measured window's end: no request is sent after it."""
    give_up: float
    """When a request still unanswered is given up on (its worker stops)."""


async def run_load(
    host: str,
    port: int,
    make_request: Callable[[int], bytes],
    *,
    concurrency: int,
    duration: float,
    warmup: float = 0.5,
    grace: float | None = None,
) -> LoadResult:
    """Run ``concurrency`` closed-loop workers for ``warmup + duration`` seconds, and
    wait at most ``grace`` seconds more (default: ``max(5, duration)``) for the requests
    then in flight; one still unanswered then is an error."""
    result = LoadResult()
    measure_from = time.perf_counter() + warmup
    deadline = measure_from + duration
    window = _Window(measure_from, deadline, deadline + (max(5.0, duration) if grace is None else grace))
    counter = [0]
    await asyncio.gather(
        *(_worker(host, port, make_request, window, result, counter) for _ in range(concurrency))
    )
    result.elapsed = duration
    return result


async def send_at_once(
    host: str, port: int, payload: bytes, count: int, give_up_after: float = 60.0
) -> list[tuple[int, float]]:
    """Send ``payload`` on ``count`` connections at the same moment (each connection is
    opened first); returns each response's status (0: the connection failed, the stream
    ended with an error event, or no answer came within ``give_up_after`` seconds: a stuck
    target must not hang the bench) and seconds, in order of sending."""
    connections = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(count)))
    go = asyncio.Event()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, float]:
        await go.wait()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(give_up_after):
                answer = await _exchange(reader, writer, payload)
            return (0 if answer.failed else answer.status), time.perf_counter() - started
        except (*_DROPPED, TimeoutError):
            return 0, time.perf_counter() - started
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(one(reader, writer)) for reader, writer in connections]
    await asyncio.sleep(0)  # every task waits on the event before it is set
    go.set()
    return list(await asyncio.gather(*tasks))
