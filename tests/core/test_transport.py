"""The aiohttp-backed httpx transport: pooling, error translation, prompt close."""

import asyncio
import socket

import anyio
import httpx
import pytest

from llmrouter.testing.upstream import FakeUpstream
from llmrouter.transport import AiohttpTransport

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def raw_server(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_keep_alive_reuses_one_connection_and_posts_bodies():
    with FakeUpstream() as up:
        async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
            for _ in range(3):
                response = await client.post(
                    f"{up.base_url}/chat/completions",
                    json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}]},
                )
                assert response.status_code == 200 and response.json()["object"] == "chat.completion"
        ports = {record.client[1] for record in up.generation_requests()}
        assert len(ports) == 1, "three requests on one pooled connection"


async def test_connection_refused_is_connect_error():
    async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{free_port()}/")


async def test_read_timeout_is_read_timeout():
    async def silent(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(5)
        writer.close()

    server, port = await raw_server(silent)
    async with (
        server,
        httpx.AsyncClient(transport=AiohttpTransport(), timeout=httpx.Timeout(5, read=0.1)) as client,
    ):
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"http://127.0.0.1:{port}/")


async def test_dropped_connection_mid_body_is_a_transport_error():
    async def half(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a little")
        await writer.drain()
        writer.close()

    server, port = await raw_server(half)
    async with server, httpx.AsyncClient(transport=AiohttpTransport()) as client:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await client.get(f"http://127.0.0.1:{port}/")


async def test_closing_an_unread_stream_closes_the_connection():
    async with FakeUpstream(chunks=50, delay_ms=20) as up:
        async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
            body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "x"}]}
            async with client.stream("POST", f"{up.base_url}/chat/completions", json=body) as response:
                async for _ in response.aiter_bytes():
                    break
            record = (await up.wait_for_requests(1))[0]
            with anyio.fail_after(1):
                await record.wait_disconnected()
