"""The ASGI app behind :class:`~llmrouter.testing.upstream.FakeUpstream`.

A plain ASGI callable (no framework) so that it costs next to nothing per request:
benchmarks use it to measure a gateway's own overhead. Each request gets a watcher
task on ``receive()`` so that a client going away is recorded the moment the server
sees the connection close (``http.disconnect``), and any delay in progress ends.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from llmrouter.testing._fake_behaviour import (
    _JSON_HEADERS,
    _SSE_HEADERS,
    Behaviour,
    Plan,
    RecordedRequest,
    UpstreamState,
    _json_decoder,
    _json_encode,
    _last_user_text,
    _parse_behaviour,
    error_body,
    new_id,
    plan_reply,
    usage_dict,
)

__all__ = ["FakeOpenAIApp"]

_DONE = b"data: [DONE]\n\n"


class _Connection:
    """One request's connection: sends, sleeps that end when the client leaves, the record."""

    __slots__ = ("done", "gone", "record", "send")

    def __init__(self, send: Any, record: RecordedRequest) -> None:
        self.send = send
        self.record = record
        self.gone = asyncio.Event()
        self.done = False

    async def sleep(self, seconds: float) -> bool:
        """Sleep; True when the client went away meanwhile (the caller should stop)."""
        if seconds <= 0:
            return self.gone.is_set()
        try:
            await asyncio.wait_for(self.gone.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, more: bool = True) -> None:
        if not more:
            # Mark completion before the last send: the watcher wakes on response end too.
            self.done = True
            self.record.completed_at = time.monotonic()
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def respond(
        self, status: int, data: bytes, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        await self.start(status, [*(headers or _JSON_HEADERS), (b"content-length", str(len(data)).encode())])
        await self.body(data, more=False)

    async def watch(self, receive: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.done:
                    self.record.disconnected_at = time.monotonic()
                self.gone.set()
                return


class FakeOpenAIApp:
    """An OpenAI-compatible ASGI app answering from :class:`UpstreamState`."""

    def __init__(self, state: UpstreamState) -> None:
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        record = RecordedRequest(scope["method"], scope["path"], headers, bytes(body), time.monotonic())
        if scope.get("client"):
            host, port = scope["client"]
            record.client = f"{host}:{port}"
        if self.state.record and not scope["path"].startswith("/_fake/"):
            self.state.requests.append(record)
        conn = _Connection(send, record)
        watcher = asyncio.create_task(conn.watch(receive))
        try:
            await self._route(conn, scope["method"], scope["path"])
        finally:
            watcher.cancel()

    async def _route(self, conn: _Connection, method: str, path: str) -> None:
        state = self.state
        if path.startswith("/_fake/"):
            await self._control(conn, method, path)
            return
        if path in ("/health", "/healthz"):
            await conn.respond(200, b'{"status":"ok"}')
            return
        if path.startswith("/v1/"):
            path = path[3:]
        if (
            state.api_key is not None
            and conn.record.headers.get("authorization") != f"Bearer {state.api_key}"
        ):
            await _error(
                conn,
                Behaviour(
                    status=401,
                    error_type="authentication_error",
                    error_code="invalid_api_key",
                    error_message="invalid API key",
                ),
            )
            return
        if method == "GET" and path == "/models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in state.models]
            await conn.respond(200, _json_encode({"object": "list", "data": data}))
        elif method == "POST" and path in ("/chat/completions", "/completions"):
            await self._generate(conn, chat=path == "/chat/completions")
        else:
            await _error(
                conn,
                Behaviour(
                    status=404, error_type="not_found_error", error_message=f"no route for {method} {path}"
                ),
            )

    async def _control(self, conn: _Connection, method: str, path: str) -> None:
        state = self.state
        if path == "/_fake/requests":
            await conn.respond(200, _json_encode([r.to_dict() for r in state.requests]))
            return
        if path == "/_fake/reset" and method == "POST":
            state.requests.clear()
            with state.lock:
                state.queue.clear()
        elif path == "/_fake/script" and method == "POST":
            raw = _json_decoder.decode(conn.record.body or b"[]")
            items = raw if isinstance(raw, list) else [raw]
            scripts = [
                _parse_behaviour(i) if isinstance(i, str) else msgspec.convert(i, Behaviour) for i in items
            ]
            with state.lock:
                state.queue.extend(scripts)
        else:
            await _error(conn, Behaviour(status=404, error_message=f"no control route {path}"))
            return
        await conn.respond(200, b'{"ok":true}')

    async def _generate(self, conn: _Connection, *, chat: bool) -> None:
        state = self.state
        try:
            body = _json_decoder.decode(conn.record.body)
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            behaviour = state.pick(conn.record.headers.get("x-fake-behaviour"), str(body.get("model", "")))
        except (ValueError, msgspec.DecodeError) as exc:
            await _error(
                conn, Behaviour(status=400, error_type="invalid_request_error", error_message=str(exc))
            )
            return
        conn.record.behaviour = behaviour.name or ("custom" if behaviour != Behaviour() else "")
        model = str(body.get("model", ""))
        if state.strict_models and model not in state.models:
            await _error(
                conn,
                Behaviour(
                    status=404,
                    error_type="invalid_request_error",
                    error_code="model_not_found",
                    error_message=f"The model `{model}` does not exist.",
                ),
            )
            return
        first = behaviour.first_byte_delay_ms
        first = state.first_byte_delay_ms if first is None else first
        if first and await conn.sleep(first / 1000):
            return
        if behaviour.status >= 400:
            await _error(conn, behaviour)
            return
        plan = plan_reply(state, behaviour, body)
        delay = (behaviour.delay_ms if behaviour.delay_ms is not None else state.delay_ms) / 1000
        stream = bool(body.get("stream")) and not behaviour.ignore_stream
        if stream:
            await _stream(conn, behaviour, body, plan, delay, chat=chat)
        else:
            await _complete(conn, behaviour, body, plan, delay, chat=chat)


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _error(conn: _Connection, behaviour: Behaviour) -> None:
    headers = list(_JSON_HEADERS)
    if behaviour.retry_after is not None:
        headers.append((b"retry-after", behaviour.retry_after.encode()))
    headers += [(k.encode(), v.encode()) for k, v in behaviour.headers.items()]
    await conn.respond(behaviour.status, error_body(behaviour), headers)


def _tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
    tools = body.get("tools") or []
    if not tools or body.get("tool_choice") == "none":
        return None
    name = tools[0].get("function", {}).get("name", "tool")
    arguments = _json_encode({"text": _last_user_text(body)}).decode()
    return {"id": new_id("call"), "type": "function", "function": {"name": name, "arguments": arguments}}


async def _complete(
    conn: _Connection, behaviour: Behaviour, body: dict[str, Any], plan: Plan, delay: float, *, chat: bool
) -> None:
    # A real server takes time per token before answering; the client may give up meanwhile.
    if delay and await conn.sleep(delay * max(1, len(plan.pieces))):
        return
    if behaviour.invalid_json:
        await conn.respond(200, b"this is not json {")
        return
    text = "".join(plan.pieces)
    model = body.get("model", "")
    created = int(time.time())
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = plan.finish_reason
        call = _tool_call(body) if behaviour.tool_call else None
        if call is not None:
            message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        data = {
            "id": new_id("chatcmpl"),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choice],
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": plan.finish_reason, "logprobs": None}
        data = {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
        }
    if not behaviour.omit_usage:
        data["usage"] = usage_dict(plan)
    payload = _json_encode(data)
    if behaviour.break_after is not None:
        # Promise the whole body, send half of it, then drop the connection.
        await conn.start(200, [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())])
        await conn.body(payload[: len(payload) // 2])
        return
    await conn.respond(200, payload)


async def _stream(
    conn: _Connection, behaviour: Behaviour, body: dict[str, Any], plan: Plan, delay: float, *, chat: bool
) -> None:
    model = body.get("model", "")
    created = int(time.time())
    kind = b"chat.completion.chunk" if chat else b"text_completion"
    head = b'data: {"id":"' + new_id("chatcmpl" if chat else "cmpl").encode() + b'","object":"' + kind
    head += b'","created":' + str(created).encode() + b',"model":' + _json_encode(model) + b',"choices":['
    if chat:
        piece_open, piece_close = b'{"index":0,"delta":{"content":', b'},"finish_reason":null}]}\n\n'
    else:
        piece_open, piece_close = b'{"index":0,"text":', b',"finish_reason":null,"logprobs":null}]}\n\n'
    await conn.start(200, list(_SSE_HEADERS))
    if behaviour.invalid_json:
        await conn.body(b"data: this is not json {\n\n" + _DONE, more=False)
        return
    if chat:
        await conn.body(
            head + b'{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
        )
    call = _tool_call(body) if chat and behaviour.tool_call else None
    pieces = plan.pieces if call is None else []
    for index, piece in enumerate(pieces):
        if index and delay and await conn.sleep(delay):
            return
        if conn.gone.is_set() or index == behaviour.break_after:
            return  # returning mid-body makes the server drop the connection
        if index == behaviour.error_after:
            error = error_body(behaviour)
            await conn.body(b"data: " + error + b"\n\n" + _DONE, more=False)
            return
        await conn.body(head + piece_open + _json_encode(piece) + piece_close)
        conn.record.chunks_sent += 1
    finish = plan.finish_reason
    if call is not None:
        finish = "tool_calls"
        await conn.body(
            head
            + _json_encode(
                {"index": 0, "delta": {"tool_calls": [{"index": 0, **call}]}, "finish_reason": None}
            )
            + b"]}\n\n"
        )
    end = b'{"index":0,"delta":{},"finish_reason":' if chat else b'{"index":0,"text":"","finish_reason":'
    tail = head + end + _json_encode(finish) + b"}]}\n\n"
    options = body.get("stream_options") or {}
    if options.get("include_usage") and not behaviour.omit_usage:
        tail += head + b'],"usage":' + _json_encode(usage_dict(plan)) + b"}\n\n"
    await conn.body(tail + _DONE, more=False)
