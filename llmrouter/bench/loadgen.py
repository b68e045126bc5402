"""A small closed-loop HTTP/1.1 load generator on raw asyncio streams.

Python HTTP clients (httpx in particular) cost more CPU per request than the gateway
under test, so this one only writes pre-encoded requests and parses just enough of the
answer: the status line, ``Content-Length`` or chunked framing, and the arrival time of
the first body bytes (time to first chunk for SSE). Each of ``concurrency`` workers
keeps one connection alive and sends its next request when the previous one ended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["LoadResult", "http_request", "run_load", "send_at_once"]


@dataclass
class LoadResult:
    """Latencies (seconds) of the requests that ended inside the measured window, however
    long before it they started: a target whose requests take nearly as long as the
    window (LiteLLM's streams at concurrency 64: ~1 s) would otherwise show a fraction of
    its throughput, only the few requests that both started and ended in it."""

    latencies: list[float] = field(default_factory=list)
    first_bytes: list[float] = field(default_factory=list)
    errors: int = 0
    total: int = 0
    """Every response received, warm-up included (for CPU per request)."""
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def completed(self) -> int:
        return len(self.latencies)


async def _read_body(reader: asyncio.StreamReader, headers: bytes) -> float | None:
    """Consume the body; return when its first bytes arrived (None if it had none)."""
    lower = headers.lower()
    if b"transfer-encoding: chunked" in lower:
        first: float | None = None
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return first
            await reader.readexactly(size + 2)
            if first is None:
                first = time.perf_counter()
    marker = lower.find(b"content-length:")
    if marker == -1:
        return None
    length = int(lower[marker + 15 : lower.index(b"\r\n", marker)])
    if length:
        await reader.readexactly(length)
        return time.perf_counter()
    return None


_DROPPED = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)
"""What a request whose connection failed, or was closed mid-answer, raises."""


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
) -> tuple[int, float | None]:
    """Send one request and read its whole answer: its status, and when the first bytes
    of its body arrived (None: it had none). Raises one of :data:`_DROPPED`."""
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    return int(head[9:12]), await _read_body(reader, head)


async def _worker(
    host: str,
    port: int,
    make_request: Callable[[int], bytes],
    deadline: float,
    measure_from: float,
    result: LoadResult,
    counter: list[int],
) -> None:
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
                status, first = await _exchange(reader, writer, payload)
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
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status >= 400:
                result.errors += 1
                continue
            result.latencies.append(ended - started)
            result.first_bytes.append((first or ended) - started)
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


async def run_load(
    host: str,
    port: int,
    make_request: Callable[[int], bytes],
    *,
    concurrency: int,
    duration: float,
    warmup: float = 0.5,
) -> LoadResult:
    """Run ``concurrency`` closed-loop workers for ``warmup + duration`` seconds."""
    result = LoadResult()
    start = time.perf_counter()
    measure_from = start + warmup
    deadline = measure_from + duration
    counter = [0]
    await asyncio.gather(
        *(
            _worker(host, port, make_request, deadline, measure_from, result, counter)
            for _ in range(concurrency)
        )
    )
    result.elapsed = duration
    return result


async def send_at_once(host: str, port: int, payload: bytes, count: int) -> list[tuple[int, float]]:
    """Send ``payload`` on ``count`` connections at the same moment (each connection is
    opened first); returns each response's status (0: the connection failed) and
    seconds, in order of sending."""
    connections = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(count)))
    go = asyncio.Event()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, float]:
        await go.wait()
        started = time.perf_counter()
        try:
            status, _ = await _exchange(reader, writer, payload)
            return status, time.perf_counter() - started
        except _DROPPED:
            return 0, time.perf_counter() - started
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(one(reader, writer)) for reader, writer in connections]
    await asyncio.sleep(0)  # every task waits on the event before it is set
    go.set()
    return list(await asyncio.gather(*tasks))
