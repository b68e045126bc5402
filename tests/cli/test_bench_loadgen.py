"""The bench's load generator: what a measured window counts."""

import asyncio

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
