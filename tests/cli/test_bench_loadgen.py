"""The bench's load generator: what a measured window counts."""

import asyncio

import pytest

from llmrouter.bench.loadgen import http_request, run_load, send_at_once

pytestmark = pytest.mark.anyio

LATENCY = 0.4


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
        result = await run_load(
            "127.0.0.1",
            port,
            lambda i: http_request("127.0.0.1", port, "/", b"{}"),
            concurrency=4,
            duration=0.9,
            warmup=0.2,
        )
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
