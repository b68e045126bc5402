"""The lean HTTP/1.1 pool: reuse, framing, timeouts, errors, TLS, prompt close."""

import asyncio
import shutil
import socket
import ssl
import subprocess
from typing import Any

import anyio
import httpx
import pytest

from llmrouter.http1 import HTTP1Pool
from llmrouter.testing.upstream import FakeUpstream

pytestmark = pytest.mark.anyio

CHAT = b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}'
JSON = {"content-type": "application/json"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def raw_server(handler, ssl_context=None):
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_context)
    return server, server.sockets[0].getsockname()[1]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


async def chat(pool: HTTP1Pool) -> tuple[int, bytes]:
    """POST the chat request, read the whole answer, give the connection back."""
    response = await pool.request("POST", "/chat/completions", JSON, CHAT)
    try:
        return response.status_code, await response.aread()
    finally:
        await response.aclose()


async def test_keep_alive_reuses_one_connection_and_posts_bodies():
    with FakeUpstream() as up:
        pool = HTTP1Pool(up.base_url)
        for _ in range(3):
            status, body = await chat(pool)
            assert status == 200 and b'"chat.completion"' in body
        await pool.aclose()
        records = up.generation_requests()
        assert len(records) == 3 and records[0].path == "/v1/chat/completions"
        assert len({record.client for record in records}) == 1, "three requests on one pooled connection"


async def test_streamed_body_arrives_in_pieces_and_the_connection_is_reused():
    async with FakeUpstream(chunks=5, delay_ms=10) as up:
        pool = HTTP1Pool(up.base_url)
        body = CHAT[:-1] + b', "stream": true}'
        for _ in range(2):
            response = await pool.request("POST", "/chat/completions", JSON, body)
            pieces = [piece async for piece in response.aiter_bytes()]
            await response.aclose()
            assert response.headers["content-type"].startswith("text/event-stream")
            assert len(pieces) > 5 and b"".join(pieces).rstrip().endswith(b"data: [DONE]")
        await pool.aclose()
        assert len({record.client for record in up.generation_requests()}) == 1


async def test_sends_host_path_prefix_headers_and_content_length():
    seen: list[bytes] = []

    async def handler(reader, writer):
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Thing: A\r\n\r\nok")
        await writer.drain()
        writer.close()

    server, port = await raw_server(handler)
    async with server:
        pool = HTTP1Pool(f"http://user:pw@127.0.0.1:{port}/v1/")
        response = await pool.request("POST", "/chat/completions", {"authorization": "Bearer k"}, b"{}")
        assert await response.aread() == b"ok" and response.headers["x-thing"] == "A"
        await response.aclose()
        virtual = await pool.request("GET", "/models", {"host": "api.internal.example"})
        await virtual.aread()
        await virtual.aclose()
        with pytest.raises(ValueError, match="GET and POST"):
            await pool.request("HEAD", "/models", {})  # its answer's length would be waited for
    request = seen[0]
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{port}\r\n".encode() in request  # no user info
    assert b"authorization: Bearer k\r\n" in request and b"content-length: 2\r\n" in request
    assert request.endswith(b"\r\n\r\n{}")
    assert seen[1].count(b"host:") == 1 and b"host: api.internal.example\r\n" in seen[1]


async def test_close_delimited_and_large_bodies_are_read_whole():
    big = b"x" * (3 * 1024 * 1024)  # over the pause threshold: reading pauses and resumes

    async def handler(reader, writer):
        request = await read_request(reader)
        if b"/close" in request:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + big)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for start in range(0, len(big), 65536):
                piece = big[start : start + 65536]
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server, port = await raw_server(handler)
    async with server:
        pool = HTTP1Pool(f"http://127.0.0.1:{port}")
        for path in ("/close", "/chunked"):
            response = await pool.request("GET", path, {})
            assert await response.aread() == big, path
            await response.aclose()


async def test_connection_refused_is_connect_error():
    pool = HTTP1Pool(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(httpx.ConnectError):
        await pool.request("GET", "/", {})


async def test_a_handshake_that_never_ends_is_a_connect_timeout():
    async def silent(reader, writer):
        await asyncio.sleep(5)

    server, port = await raw_server(silent)
    async with server:
        pool = HTTP1Pool(f"https://127.0.0.1:{port}", connect_timeout=0.1)
        with pytest.raises(httpx.ConnectTimeout):
            await pool.request("GET", "/", {})


async def test_read_timeouts_cover_the_head_and_each_pause_in_the_body():
    async def slow(reader, writer):
        request = await read_request(reader)
        if b"/body" in request:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await writer.drain()
        await asyncio.sleep(5)
        writer.close()

    server, port = await raw_server(slow)
    async with server:
        pool = HTTP1Pool(f"http://127.0.0.1:{port}")
        with pytest.raises(httpx.ReadTimeout):
            await pool.request("GET", "/head", {}, read_timeout=0.1)
        response = await pool.request("GET", "/body", {}, read_timeout=0.1)
        with pytest.raises(httpx.ReadTimeout):
            await response.aread()
        await response.aclose()


async def test_dropped_connection_mid_body_is_a_transport_error():
    async def half(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a little")
        await writer.drain()
        writer.close()

    server, port = await raw_server(half)
    async with server:
        pool = HTTP1Pool(f"http://127.0.0.1:{port}")
        response = await pool.request("GET", "/", {})
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await response.aread()


async def test_garbage_is_a_protocol_error():
    async def garbage(reader, writer):
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    server, port = await raw_server(garbage)
    async with server:
        pool = HTTP1Pool(f"http://127.0.0.1:{port}")
        with pytest.raises(httpx.RemoteProtocolError):
            await pool.request("GET", "/", {})


def answering_once_per_connection() -> tuple[Any, list[int]]:
    """A server handler that answers the first request of each connection and drops the
    next one unanswered, and the list it counts its connections in."""
    connections: list[int] = []

    async def handle(reader, writer):
        connections.append(1)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # the next request on this connection is dropped unanswered
        writer.close()

    return handle, connections


async def test_a_kept_alive_connection_the_server_dropped_is_retried_on_a_new_one():
    handler, connections = answering_once_per_connection()
    server, port = await raw_server(handler)
    async with server:
        pool = HTTP1Pool(f"http://127.0.0.1:{port}")
        for _ in range(3):
            response = await pool.request("POST", "/", JSON, b"{}")
            assert await response.aread() == b"ok"
            await response.aclose()
    assert len(connections) == 3


async def test_with_several_idle_connections_dropped_the_retry_still_opens_a_new_one():
    handler, connections = answering_once_per_connection()
    server, port = await raw_server(handler)
    async with server:
        pool = HTTP1Pool(f"http://127.0.0.1:{port}")
        first, second = [await pool.request("POST", "/", JSON, b"{}") for _ in range(2)]
        for response in (first, second):  # two idle connections, both to be dropped
            assert await response.aread() == b"ok"
            await response.aclose()
        response = await pool.request("POST", "/", JSON, b"{}")  # before: the retry took the other
        assert await response.aread() == b"ok"
        await response.aclose()
    assert len(connections) == 3


async def test_a_fresh_connection_dropped_without_an_answer_is_not_retried():
    calls = 0

    async def drop(reader, writer):
        nonlocal calls
        calls += 1
        await read_request(reader)
        writer.close()

    server, port = await raw_server(drop)
    async with server:
        pool = HTTP1Pool(f"http://127.0.0.1:{port}")
        with pytest.raises(httpx.RemoteProtocolError):
            await pool.request("POST", "/", JSON, b"{}")
    assert calls == 1


async def test_a_request_the_server_worked_on_before_dropping_is_not_sent_again():
    """Dropped past the idle-close race (a worker dying mid-generation): the server may
    have acted on the POST, so it is the caller's to retry, not the pool's, unseen."""
    bodies: list[bytes] = []

    async def answer_once_then_work_and_drop(reader, writer):
        bodies.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        bodies.append(await read_request(reader))
        await asyncio.sleep(0.3)  # working on it, then gone
        writer.close()

    server, port = await raw_server(answer_once_then_work_and_drop)
    async with server:
        pool = HTTP1Pool(f"http://127.0.0.1:{port}")
        response = await pool.request("POST", "/", JSON, b"{}")
        assert await response.aread() == b"ok"
        await response.aclose()
        with pytest.raises(httpx.RemoteProtocolError):
            await pool.request("POST", "/", JSON, b'{"n": 2}')
    assert len(bodies) == 2, "the second POST reached the server once"


async def test_on_a_slow_link_a_close_crossing_the_request_is_still_sent_again():
    """The idle close crosses the request up to a round trip after the send: on a link of
    200 ms round trips (as the connection's opening measured it), a drop 250 ms after the
    send is that race, not a server that worked on the request."""
    connections: list[int] = []

    async def answer_once_then_drop_late(reader, writer):
        connections.append(1)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)
        await asyncio.sleep(0.25)  # the close arriving a slow link's round trip later
        writer.close()

    server, port = await raw_server(answer_once_then_drop_late)
    async with server:
        pool = HTTP1Pool(f"http://127.0.0.1:{port}")
        response = await pool.request("POST", "/", JSON, b"{}")
        assert await response.aread() == b"ok"
        await response.aclose()
        pool._idle[0].round_trip = 0.2
        response = await pool.request("POST", "/", JSON, b"{}")
        assert await response.aread() == b"ok"
        await response.aclose()
    assert len(connections) == 2


async def test_idle_connections_expire():
    with FakeUpstream() as up:
        pool = HTTP1Pool(up.base_url, keepalive_expiry=0.05)
        for _ in range(2):
            await chat(pool)
            await anyio.sleep(0.1)
        await pool.aclose()
        assert len({record.client for record in up.generation_requests()}) == 2


async def test_header_injection_is_refused():
    pool = HTTP1Pool("http://127.0.0.1:1")
    with pytest.raises(httpx.LocalProtocolError):
        await pool.request("GET", "/", {"x-request-id": "a\r\nx-admin: 1"})
    for value in ("a\nb", "a\rb", "a\x00b"):
        with pytest.raises(httpx.LocalProtocolError):
            await pool.request("GET", "/", {"x-request-id": value})
    with pytest.raises(httpx.LocalProtocolError):
        await pool.request("GET", "/", {"bad name": "v"})


async def test_max_connections_queue_and_pool_timeout():
    with FakeUpstream() as up:
        pool = HTTP1Pool(up.base_url, max_connections=1, pool_timeout=0.1)
        held = await pool.request("POST", "/chat/completions", JSON, CHAT)
        with pytest.raises(httpx.PoolTimeout):
            await pool.request("POST", "/chat/completions", JSON, CHAT)
        await held.aread()
        await held.aclose()
        response = await pool.request("POST", "/chat/completions", JSON, CHAT)  # the slot is back
        assert response.status_code == 200
        await response.aclose()
        await pool.aclose()


async def test_closing_an_unread_stream_closes_the_connection():
    async with FakeUpstream(chunks=50, delay_ms=20) as up:
        pool = HTTP1Pool(up.base_url)
        body = CHAT[:-1] + b', "stream": true}'
        response = await pool.request("POST", "/chat/completions", JSON, body)
        async for _ in response.aiter_bytes():
            break
        await response.aclose()
        record = (await up.wait_for_requests(1))[0]
        with anyio.fail_after(1):
            await record.wait_disconnected()


async def test_cancelling_while_waiting_for_the_head_closes_the_connection():
    async with FakeUpstream(delay_ms=2000) as up:
        pool = HTTP1Pool(up.base_url)
        with anyio.move_on_after(0.2):
            await pool.request("POST", "/chat/completions", JSON, CHAT)
        record = (await up.wait_for_requests(1))[0]
        with anyio.fail_after(1):
            await record.wait_disconnected()


def test_one_pool_serves_successive_event_loops():
    with FakeUpstream() as up:
        pool = HTTP1Pool(up.base_url)

        assert asyncio.run(chat(pool))[0] == 200
        assert asyncio.run(chat(pool))[0] == 200


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_verifies_against_the_given_bundle(tls_files):
    cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def hello(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()

    server, port = await raw_server(hello, context)
    async with server:
        for verify in (str(cert), False):
            pool = HTTP1Pool(f"https://127.0.0.1:{port}", verify=verify)
            response = await pool.request("GET", "/", {})
            assert await response.aread() == b"hello"
            await response.aclose()
            await pool.aclose()
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await HTTP1Pool(f"https://127.0.0.1:{port}").request("GET", "/", {})


async def test_requests_over_the_limit_wait_their_turn():
    async with FakeUpstream(delay_ms=5) as up:
        pool = HTTP1Pool(up.base_url, max_connections=2)

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(chat, pool)
        await pool.aclose()
        assert len(up.generation_requests()) == 10
        assert len({record.client for record in up.generation_requests()}) == 2, (
            "never more than two connections"
        )
        assert pool._in_use == 0 and not pool._queue


async def test_a_cancelled_waiter_gives_up_its_turn():
    with FakeUpstream() as up:
        pool = HTTP1Pool(up.base_url, max_connections=1)
        held = await pool.request("POST", "/chat/completions", JSON, CHAT)
        with anyio.move_on_after(0.05):
            await pool.request("POST", "/chat/completions", JSON, CHAT)
        await held.aread()
        await held.aclose()
        assert pool._in_use == 0
        response = await pool.request("POST", "/chat/completions", JSON, CHAT)
        assert response.status_code == 200
        await response.aclose()
        await pool.aclose()


async def test_a_pooled_connection_seen_closed_is_not_reused():
    with FakeUpstream() as up:
        pool = HTTP1Pool(up.base_url)
        await chat(pool)
        idle = pool._idle[0]
        idle.transport.close()  # as if the server had closed it while idle
        response = await pool.request("POST", "/chat/completions", JSON, CHAT)
        assert response.status_code == 200 and idle not in pool._idle
        await response.aclose()
        await pool.aclose()


async def test_informational_responses_are_skipped():
    async def hints(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Final: yes\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(1)

    server, port = await raw_server(hints)
    async with server:
        pool = HTTP1Pool(f"http://127.0.0.1:{port}")
        response = await pool.request("GET", "/", {})
        assert response.status_code == 200 and response.headers == {"content-length": "2", "x-final": "yes"}
        assert await response.aread() == b"ok"
        await response.aclose()
        await pool.aclose()
