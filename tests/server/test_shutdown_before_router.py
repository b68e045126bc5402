"""The server's cancellation at the end of the drain, before the router is called.

uvicorn cancels the requests left when ``server.drain_seconds`` runs out. A request whose
body was still arriving, or whose credentials were still being checked, got uvicorn's
plain-text 500 (and a traceback in the log): only the router's part turned the
cancellation into the documented ``503 server_shutting_down``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import anyio
import msgspec
import pytest

from llmrouter.context import RequestContext
from llmrouter.extension import Extension
from llmrouter.router import Router
from llmrouter.server import create_app
from llmrouter.testing.scripted import ScriptedProvider, Step

pytestmark = pytest.mark.anyio

PATHS = ["/v1/chat/completions", "/v1/completions"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn's: the server cancels the request's task


class _SlowAuth(Extension):
    name = "slow-auth"

    def __init__(self, started: asyncio.Event) -> None:
        self.started = started

    async def authenticate(self, ctx: RequestContext, headers: Mapping[str, str]) -> None:
        self.started.set()
        await asyncio.sleep(30)


def _app(*extensions: Extension) -> Any:
    router = Router()
    router.add_deployment("m", ScriptedProvider("upstream-m", default=Step(echo=True)))
    return create_app(router=router, extensions=extensions)


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", b"1000"),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }


async def _cancelled_by_the_server(app: Any, path: str, started: asyncio.Event) -> list[Any]:
    """Run ``app`` on a request whose body never ends; cancel its task, as uvicorn does,
    once ``started`` is set; the messages it sent."""
    sent: list[Any] = []
    parts = [{"type": "http.request", "body": b'{"model": "m', "more_body": True}]

    async def receive() -> dict[str, Any]:
        if parts:
            return parts.pop(0)
        started.set()
        await asyncio.sleep(30)  # the rest of the body never comes
        raise AssertionError("not cancelled")

    async def send(message: Any) -> None:
        sent.append(message)

    task = asyncio.ensure_future(app(_scope(path), receive, send))
    with anyio.fail_after(5):
        await started.wait()
    task.cancel("Task cancelled, timeout graceful shutdown exceeded")
    with anyio.fail_after(5):
        await task  # the app answered: no CancelledError for the server to log as a 500
    assert not task.cancelled() and task.cancelling() == 0
    return sent


def _assert_503(sent: list[Any]) -> None:
    start, body = sent[0], sent[1]
    assert start["type"] == "http.response.start"
    assert start["status"] == 503
    headers = {name.lower(): value for name, value in start["headers"]}
    assert headers[b"retry-after"] == b"1"
    error = msgspec.json.decode(body["body"])["error"]
    assert error["code"] == "server_shutting_down"


@pytest.mark.parametrize("path", PATHS)
async def test_cancelled_while_the_body_arrives_is_a_503(path: str) -> None:
    _assert_503(await _cancelled_by_the_server(_app(), path, asyncio.Event()))


@pytest.mark.parametrize("path", PATHS)
async def test_cancelled_while_authenticating_is_a_503(path: str) -> None:
    started = asyncio.Event()
    _assert_503(await _cancelled_by_the_server(_app(_SlowAuth(started)), path, started))


@pytest.mark.parametrize("path", PATHS)
async def test_an_enclosing_cancel_scope_still_cancels(path: str) -> None:
    # Not the server's cancellation of the task: it propagates as it did.
    app = _app()
    sent: list[Any] = []
    started = asyncio.Event()

    async def receive() -> dict[str, Any]:
        started.set()
        await asyncio.sleep(30)
        raise AssertionError("not cancelled")

    async def send(message: Any) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(app, _scope(path), receive, send)
            await started.wait()
            group.cancel_scope.cancel()
    assert sent == []
