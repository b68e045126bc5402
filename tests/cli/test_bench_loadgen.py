"""The bench's load generator: what a measured window counts."""

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from llmrouter.bench.loadgen import LoadResult, http_request, run_load, send_at_once

pytestmark = pytest.mark.anyio

LATENCY = 0.4


async def _load(port: int, *, concurrency: int, duration: float, warmup: float) -> LoadResult:
    """``run_load`` of the same small POST against 127.0.0.1:``port``."""
    request = http_request("127.0.0.1", port, "/", b"{}")
    return await run_load(
        "127.0.0.1", port, lambda i: request, concurrency=concurrency, duration=duration, warmup=warmup
    )


async def test_the_window_counts_requests_that_ended_in_it() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                await asyncio.sleep(LATENCY)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        # Each of 4 workers' requests end at ~0.4, 0.8 and 1.2 s; the window is 0.2-1.1 s.
        result = await _load(port, concurrency=4, duration=0.9, warmup=0.2)
    # Two a worker, the first started in the warm-up (counting only requests started in
    # the window, as the bench did, gave 4: half the throughput).
    assert result.completed == 8 and result.errors == 0
    assert result.total == 12  # the third ended after the window: CPU counts it, the window not
    assert all(abs(latency - LATENCY) < 0.1 for latency in result.latencies)


async def test_a_burst_counts_a_dropped_connection_as_a_failure() -> None:
    async def drop_every_other(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        if next(numbers) % 2:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
        writer.close()

    numbers = iter(range(100))
    server = await asyncio.start_server(drop_every_other, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        answers = await send_at_once("127.0.0.1", port, http_request("127.0.0.1", port, "/", b"{}"), 6)
    assert sorted(status for status, _ in answers) == [0, 0, 0, 200, 200, 200]


async def _serve(answer: str) -> asyncio.Server:
    """A server taking 50 ms a request, then answering 503 or dropping the connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
                await asyncio.sleep(0.05)
                if answer == "drop":
                    writer.transport.abort()
                    return
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_dropped_requests_count_as_errors_in_the_window_as_error_statuses_do() -> None:
    # Before: drops were errors over the whole run (warm-up included, twice as many) and
    # left out of the requests the CPU is divided by.
    counts = {}
    for answer in ("503", "drop"):
        server = await _serve(answer)
        port = server.sockets[0].getsockname()[1]
        async with server:
            result = await _load(port, concurrency=1, duration=0.5, warmup=0.5)
        counts[answer] = (result.errors, result.total)
    errors_503, total_503 = counts["503"]
    errors_drop, total_drop = counts["drop"]
    assert abs(errors_drop - errors_503) <= 2 and abs(total_drop - total_503) <= 2
    assert errors_drop < total_drop  # the warm-up's are requests, not errors


async def test_a_server_that_stops_listening_is_errors_not_the_end_of_the_bench() -> None:
    server = await _serve("drop")
    port = server.sockets[0].getsockname()[1]

    async def stop() -> None:
        await asyncio.sleep(0.2)
        server.close()

    stopping = asyncio.ensure_future(stop())
    result = await _load(port, concurrency=2, duration=0.5, warmup=0.1)  # before: ConnectionRefusedError
    await stopping
    assert result.errors > 0 and result.completed == 0


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


async def _serve_streams(answer: Callable[[int, asyncio.StreamWriter], Awaitable[None]]) -> asyncio.Server:
    """A server answering every request with a chunked SSE stream: ``answer`` writes the
    events of request number ``n`` (from 0), then the stream ends."""
    numbers = iter(range(1_000_000))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                await answer(next(numbers), writer)
                writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n'
ERROR = b'data: {"error":{"message":"engine died","type":"server_error"}}\n\n'


async def test_a_stream_that_ends_with_an_error_event_is_an_error() -> None:
    # Before: a 200 whatever followed, so a failed stream was a success, and a quick one.
    async def every_other_fails(number: int, writer: asyncio.StreamWriter) -> None:
        writer.write(_chunk(ROLE) + _chunk(TOKEN))
        if number % 2:
            writer.write(_chunk(ERROR))
        await asyncio.sleep(0.01)

    server = await _serve_streams(every_other_fails)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await _load(port, concurrency=1, duration=0.4, warmup=0.0)
        answers = await send_at_once("127.0.0.1", port, http_request("127.0.0.1", port, "/", b"{}"), 4)
    assert result.completed > 5 and abs(result.errors - result.completed) <= 1
    assert result.statuses == {200: result.completed + result.errors}  # the status said 200
    assert sorted(status for status, _ in answers) == [0, 0, 200, 200]


async def test_time_to_first_token_is_the_first_content_not_the_first_chunk() -> None:
    # Before: the role-only chunk a gateway forwards at once made it look instant.
    async def thinks(number: int, writer: asyncio.StreamWriter) -> None:
        writer.write(_chunk(ROLE))
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(_chunk(TOKEN))

    server = await _serve_streams(thinks)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await _load(port, concurrency=1, duration=0.3, warmup=0.0)
    assert result.completed >= 2
    assert all(0.09 < first < 0.2 for first in result.first_content), result.first_content


def test_what_counts_as_content() -> None:
    from llmrouter.bench.loadgen import _carries_content

    assert not _carries_content(ROLE)
    assert not _carries_content(b'data: {"choices":[{"delta":{"content":null}}]}\n\n')
    assert _carries_content(TOKEN)
    assert _carries_content(b'data: {"choices":[{"delta":{"content":"","x":1},"content":"a"}]}\n\n')
    assert _carries_content(b'data: {"choices":[{"index":0,"text":"Hi"}]}\n\n')  # completions


async def _serve_then_hang(answered: int) -> asyncio.Server:
    """A server answering its first ``answered`` requests, then none (reading on)."""
    numbers = iter(range(1_000_000))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
                if next(numbers) < answered:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_a_target_that_stops_answering_does_not_hang_the_run() -> None:
    # Before: run_load waited for the stuck requests forever.
    server = await _serve_then_hang(answered=3)
    port = server.sockets[0].getsockname()[1]
    request = http_request("127.0.0.1", port, "/", b"{}")
    started = time.perf_counter()
    async with server:
        result = await asyncio.wait_for(
            run_load(
                "127.0.0.1", port, lambda i: request, concurrency=2, duration=0.3, warmup=0.0, grace=0.3
            ),
            10,
        )
        answers = await asyncio.wait_for(send_at_once("127.0.0.1", port, request, 2, give_up_after=0.3), 10)
    assert time.perf_counter() - started < 3
    assert result.completed == 3 and result.errors == 2 and result.total == 5  # one stuck a worker
    assert [status for status, _ in answers] == [0, 0]
