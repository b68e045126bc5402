"""A fake Ollama daemon: a real HTTP server on 127.0.0.1 that follows Ollama's docs/api.md.

Endpoints: ``POST /api/chat`` and ``POST /api/generate`` (NDJSON stream by default,
one JSON object with ``"stream": false``; the last part has ``done: true``,
``done_reason``, ``prompt_eval_count``, ``eval_count`` and the durations in
nanoseconds), ``GET /api/tags``, ``POST /api/show``, ``GET /api/version``. Errors are
Ollama's: ``{"error": "..."}`` bodies, 404 ``model "x" not found, try pulling it first``,
an ``{"error": ...}`` line in the middle of a stream, and Go's text ``404 page not found``
for any other path. With ``logprobs: true`` (and ``top_logprobs: k``) each part carries
the logprobs of its tokens, as Ollama's ``api.Logprob`` (``token``, ``logprob``, ``bytes``,
``top_logprobs``).

Knobs a test sets on :class:`FakeOllama` (reset with :meth:`FakeOllama.reset`):
``reply`` (the text, streamed a word at a time), ``token_delay`` (slow streams),
``fail_status`` / ``fail_body`` / ``fail_headers`` (an error response; ``fail_body`` is
sent as JSON, whatever it is, as a proxy in front of the daemon may), ``fail_times``
(only the first N generation requests fail),
``break_after`` (drop the connection after N parts), ``error_line_after`` (an error
line after N parts), ``tool_call`` (answer with this call when tools are offered),
``omit_prompt_count`` (a cached prompt: no ``prompt_eval_count``).
What it saw: ``requests`` (path, JSON body) and ``disconnects`` (paths whose client
went away before the response was complete).
"""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import UTC, datetime
from typing import Any

import anyio
import uvicorn

__all__ = ["FakeOllama", "ServerThread"]

Scope = dict[str, Any]


class ServerThread:
    """Run an ASGI app under uvicorn on an ephemeral 127.0.0.1 port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fake-ollama", daemon=True)
        self.url = ""

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


def _timestamp() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _words(text: str) -> int:
    return len(text.split())


class FakeOllama:
    """The ASGI app of the fake daemon, with its knobs and records."""

    def __init__(self, models: tuple[str, ...] = ("llama3.2:latest", "qwen2.5:0.5b")) -> None:
        self.models = list(models)
        self.reset()

    def reset(self) -> None:
        self.reply = "Hello from the fake Ollama daemon."
        self.token_delay = 0.0
        self.fail_status: int | None = None
        self.fail_body: Any = {"error": "fake failure"}
        self.fail_headers: dict[str, str] = {}
        self.fail_times: int | None = None
        self.break_after: int | None = None
        self.error_line_after: int | None = None
        self.tool_call: dict[str, Any] | None = None
        self.omit_prompt_count = False
        self.capabilities: list[str] = ["completion", "tools"]
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.disconnects: list[str] = []
        self.disconnected = threading.Event()

    # --- ASGI -----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path, method = scope["path"], scope["method"]
        try:
            data = json.loads(body) if body else {}
        except json.JSONDecodeError:
            await _send_json(send, 400, {"error": "invalid character in request body"})
            return
        self.requests.append((path, data))
        if method == "GET" and path == "/":
            await _send_text(send, 200, "Ollama is running")
        elif method == "GET" and path == "/api/version":
            await _send_json(send, 200, {"version": "0.12.6"})
        elif method == "GET" and path == "/api/tags":
            await _send_json(send, 200, {"models": [self._tag(name) for name in self.models]})
        elif method == "POST" and path == "/api/show":
            await self._show(send, data)
        elif method == "POST" and path in ("/api/chat", "/api/generate"):
            await self._generate(path, data, receive, send)
        else:
            await _send_text(send, 404, "404 page not found")

    def _tag(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-01-07T19:22:45.499127-08:00",
            "size": 2019393189,
            "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "3.2B",
                "quantization_level": "Q4_K_M",
            },
        }

    def _resolve(self, name: str) -> str | None:
        for candidate in (name, f"{name}:latest"):
            if candidate in self.models:
                return candidate
        return None

    async def _show(self, send: Any, data: dict[str, Any]) -> None:
        name = self._resolve(data.get("model") or data.get("name") or "")
        if name is None:
            await _send_json(send, 404, {"error": f"model '{data.get('model')}' not found"})
            return
        await _send_json(
            send,
            200,
            {
                "modelfile": f"FROM {name}",
                "parameters": 'stop "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": self._tag(name)["details"],
                "model_info": {"general.architecture": "llama", "llama.context_length": 8192},
                "capabilities": self.capabilities,
                "modified_at": "2025-01-07T19:22:45.499127-08:00",
            },
        )

    # --- generation -------------------------------------------------------------------

    def _plan(self, path: str, data: dict[str, Any]) -> tuple[list[str], str, int]:
        """The tokens to send, the done_reason, and the prompt token count."""
        options = data.get("options") or {}
        reply = self.reply
        if data.get("format") == "json" or isinstance(data.get("format"), dict):
            reply = '{"answer": "fake"}'
        tokens = re.findall(r"\S+\s*", reply)
        reason = "stop"
        limit = options.get("num_predict")
        if isinstance(limit, int) and 0 <= limit < len(tokens):
            tokens, reason = tokens[:limit], "length"
        for stop in options.get("stop") or ():
            text = "".join(tokens)
            if stop in text:
                tokens = re.findall(r"\S+\s*|\s+", text[: text.index(stop)])
                reason = "stop"
        if path == "/api/chat":
            prompt = sum(_words(str(m.get("content") or "")) + 1 for m in data.get("messages") or [])
        else:
            prompt = _words(str(data.get("prompt") or "")) + 1
        return tokens, reason, prompt

    def _part(
        self, path: str, model: str, text: str, *, done: bool, thinking: str | None = None
    ) -> dict[str, Any]:
        part: dict[str, Any] = {"model": model, "created_at": _timestamp()}
        if path == "/api/chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            part["message"] = message
        else:
            part["response"] = text
        part["done"] = done
        return part

    def _with_logprobs(
        self, part: dict[str, Any], data: dict[str, Any], tokens: list[str], start: int = 0
    ) -> dict[str, Any]:
        """``part`` with the logprobs of ``tokens`` (from the ``start``-th token of the reply)
        when the request asked for them: the i-th token gets ``-0.1 * (i + 1)``, its
        alternatives lower ones (the chosen token is the first of its ``top_logprobs``)."""
        if not data.get("logprobs") or not tokens:
            return part
        k = data.get("top_logprobs") or 0
        entries = []
        for index, token in enumerate(tokens, start):
            entry = _logprob(token, -0.1 * (index + 1))
            if k:
                entry["top_logprobs"] = [_logprob(token, entry["logprob"])] + [
                    _logprob(f"alt{j}", entry["logprob"] - j) for j in range(1, k)
                ]
            entries.append(entry)
        part["logprobs"] = entries
        return part

    def _final(
        self, path: str, model: str, text: str, reason: str, prompt: int, count: int
    ) -> dict[str, Any]:
        part = self._part(path, model, text, done=True)
        part["done_reason"] = reason
        if path == "/api/generate":
            part["context"] = [1, 2, 3]
        part.update({"total_duration": 4_883_583_458, "load_duration": 1_334_875})
        if not self.omit_prompt_count:
            part.update({"prompt_eval_count": prompt, "prompt_eval_duration": 342_546_000})
        part.update({"eval_count": count, "eval_duration": 4_535_599_000})
        return part

    async def _generate(self, path: str, data: dict[str, Any], receive: Any, send: Any) -> None:
        model = data.get("model")
        if not model:
            await _send_json(send, 400, {"error": "model is required"})
            return
        resolved = self._resolve(model)
        if resolved is None:
            await _send_json(send, 404, {"error": f'model "{model}" not found, try pulling it first'})
            return
        if self.fail_status is not None and self.fail_times != 0:
            if self.fail_times is not None:
                self.fail_times -= 1
            await _send_json(send, self.fail_status, self.fail_body, self.fail_headers)
            return
        tokens, reason, prompt = self._plan(path, data)
        call = self.tool_call if (self.tool_call and data.get("tools")) else None
        if call is not None:
            tokens = []
        completed = False

        async def watch_disconnect(scope: anyio.CancelScope) -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not completed:
                        self.disconnects.append(path)
                        self.disconnected.set()
                        scope.cancel()
                    return

        async with anyio.create_task_group() as group:
            group.start_soon(watch_disconnect, group.cancel_scope)
            if data.get("stream", True):
                await self._stream(path, resolved, data, tokens, reason, prompt, call, send)
            else:
                for _ in tokens:
                    await anyio.sleep(self.token_delay)
                final = self._final(path, resolved, "".join(tokens), reason, prompt, len(tokens))
                self._with_logprobs(final, data, tokens)
                if call is not None:
                    final["message"]["tool_calls"] = [{"function": call}]
                await _send_json(send, 200, final)
            completed = True
            group.cancel_scope.cancel()

    async def _stream(
        self,
        path: str,
        model: str,
        data: dict[str, Any],
        tokens: list[str],
        reason: str,
        prompt: int,
        call: dict[str, Any] | None,
        send: Any,
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")],
            }
        )

        async def line(obj: dict[str, Any]) -> None:
            await send(
                {"type": "http.response.body", "body": json.dumps(obj).encode() + b"\n", "more_body": True}
            )

        if data.get("think") and path == "/api/chat":
            await line(self._part(path, model, "", done=False, thinking="Let me think."))
        for index, token in enumerate(tokens):
            if self.break_after is not None and index >= self.break_after:
                raise RuntimeError("fake daemon: connection dropped mid-stream")
            if self.error_line_after is not None and index >= self.error_line_after:
                await line({"error": "an error was encountered while running the model: out of memory"})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await anyio.sleep(self.token_delay)
            await line(self._with_logprobs(self._part(path, model, token, done=False), data, [token], index))
        if call is not None:
            part = self._part(path, model, "", done=False)
            part["message"]["tool_calls"] = [{"function": call}]
            await line(part)
        await line(self._final(path, model, "", reason, prompt, len(tokens)))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


async def _send_json(send: Any, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", b"application/json; charset=utf-8")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": json.dumps(obj).encode()})


async def _send_text(send: Any, status: int, text: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": text.encode()})
