"""A fake OpenRouter: a real HTTP server on 127.0.0.1 speaking OpenRouter's documented wire format.

``POST /api/v1/chat/completions`` and ``/api/v1/completions``: JSON, or SSE (``data:``
events, ``: OPENROUTER PROCESSING`` comments while "waiting for the model", a finish chunk
with ``native_finish_reason``, then a chunk with empty ``choices`` and the ``usage`` object
with ``cost`` in USD, then ``data: [DONE]``). ``GET /api/v1/models`` (prices per token as
decimal strings), ``GET /api/v1/key``. Errors as OpenRouter sends them:
``{"error": {"code": <status>, "message": ..., "metadata": {...}}}`` with the same HTTP
status, and, once the model started, a 200 whose body or SSE event carries ``error`` with
``finish_reason: "error"``.

Knobs (reset per test): ``reply``, ``token_delay``, ``processing_comments``,
``fail_status`` / ``fail_message`` / ``fail_headers`` / ``fail_metadata``, ``error_after``
(mid-stream error after N content chunks), ``break_after`` (drop the connection after N),
``error_in_body`` (non-streamed 200 with an error and a choice ending in ``"error"``: True,
or the error object to send), ``error_only`` (an error object: the
non-streamed 200 body is that error alone, no choices), ``price_in`` / ``price_out`` (USD per
token, used to compute ``usage.cost``). Records: ``requests`` (path, headers, JSON) and
``disconnects``.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from typing import Any

import anyio
import uvicorn

__all__ = ["API_KEY", "MODELS", "FakeOpenRouter", "ServerThread"]

API_KEY = "sk-or-v1-fake-test-key"
MODELS: list[dict[str, Any]] = [
    {
        "id": "openai/gpt-4o-mini",
        "canonical_slug": "openai/gpt-4o-mini",
        "name": "OpenAI: GPT-4o-mini",
        "created": 1721260800,
        "context_length": 128000,
        "architecture": {
            "modality": "text+image->text",
            "input_modalities": ["text", "image"],
            "output_modalities": ["text"],
            "tokenizer": "GPT",
            "instruct_type": None,
        },
        "pricing": {
            "prompt": "0.00000015",
            "completion": "0.0000006",
            "request": "0",
            "image": "0.000217",
            "web_search": "0",
            "internal_reasoning": "0",
            "input_cache_read": "0.000000075",
        },
        "top_provider": {"context_length": 128000, "max_completion_tokens": 16384, "is_moderated": True},
        "per_request_limits": None,
        "supported_parameters": ["max_tokens", "temperature", "tools", "response_format", "seed"],
    },
    {
        "id": "anthropic/claude-3.5-haiku",
        "name": "Anthropic: Claude 3.5 Haiku",
        "created": 1730678400,
        "context_length": 200000,
        "pricing": {"prompt": "0.0000008", "completion": "0.000004", "request": "0", "image": "0"},
        "top_provider": {"context_length": 200000, "max_completion_tokens": 8192, "is_moderated": False},
    },
    {
        "id": "meta-llama/llama-3.2-3b-instruct:free",
        "name": "Meta: Llama 3.2 3B Instruct (free)",
        "created": 1727222400,
        "context_length": 131072,
        "pricing": {"prompt": "0", "completion": "0", "request": "0", "image": "0"},
    },
    {
        "id": "openrouter/auto",
        "name": "Auto Router",
        "created": 1699401600,
        "context_length": 2000000,
        "pricing": {"prompt": "-1", "completion": "-1"},
    },
]


class ServerThread:
    """Run an ASGI app under uvicorn on an ephemeral 127.0.0.1 port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fake-openrouter", daemon=True)

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class FakeOpenRouter:
    """The ASGI app, its knobs and its records."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.reply = "Hello from the fake OpenRouter."
        self.reasoning: str | None = None  # a reasoning model's thinking, sent before the reply
        self.annotations: list[dict[str, Any]] | None = None  # web search citations
        self.token_delay = 0.0
        self.processing_comments = 2
        self.fail_status: int | None = None
        self.fail_message = "fake failure"
        self.fail_headers: dict[str, str] = {}
        self.fail_metadata: dict[str, Any] | None = None
        self.error_after: int | None = None
        self.break_after: int | None = None
        self.error_in_body: bool | dict[str, Any] = False
        self.error_only: dict[str, Any] | None = None
        self.price_in = 0.00000015
        self.price_out = 0.0000006
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.disconnects: list[str] = []
        self.disconnected = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        data = json.loads(body) if body else {}
        self.requests.append((path, headers, data))
        if path == "/api/v1/models":
            await _json(send, 200, {"data": MODELS})
            return
        if headers.get("authorization") != f"Bearer {API_KEY}":
            await _error(
                send,
                401,
                "No cookie auth credentials found" if "authorization" not in headers else "User not found.",
            )
            return
        if path == "/api/v1/key":
            await _json(
                send,
                200,
                {
                    "data": {
                        "label": "sk-or-v1-fak...key",
                        "limit": 10,
                        "usage": 5.5,
                        "limit_remaining": 4.5,
                        "is_free_tier": False,
                    }
                },
            )
        elif path in ("/api/v1/chat/completions", "/api/v1/completions"):
            await self._completion(path, data, receive, send)
        else:
            await _error(send, 404, "Not Found")

    # --- completions -------------------------------------------------------------------

    async def _completion(self, path: str, data: dict[str, Any], receive: Any, send: Any) -> None:
        known = {m["id"] for m in MODELS}
        if data.get("model") not in known:
            await _error(send, 400, f"{data.get('model')} is not a valid model ID")
            return
        if self.fail_status is not None:
            await _error(send, self.fail_status, self.fail_message, self.fail_headers, self.fail_metadata)
            return
        chat = path.endswith("chat/completions")
        tokens = re.findall(r"\S+\s*", self.reply)
        limit = data.get("max_tokens") or data.get("max_completion_tokens")
        reason = "stop"
        if isinstance(limit, int) and limit < len(tokens):
            tokens, reason = tokens[:limit], "length"
        stops = data.get("stop") or []
        for stop in [stops] if isinstance(stops, str) else stops:
            text = "".join(tokens)
            if stop in text:
                tokens, reason = re.findall(r"\S+\s*|\s+", text[: text.index(stop)]), "stop"
        if chat:
            prompt = sum(len(str(m.get("content") or "").split()) + 1 for m in data.get("messages") or [])
        else:
            prompt = len(str(data.get("prompt") or "").split()) + 1
        thoughts = re.findall(r"\S+\s*", self.reasoning or "") if chat else []
        usage = self._usage(prompt, len(tokens) + len(thoughts), reasoning=len(thoughts))
        completed = False

        async def watch(scope: anyio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not completed:
                self.disconnects.append(path)
                self.disconnected.set()
                scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(watch, group.cancel_scope)
            if data.get("stream"):
                await self._stream(data["model"], chat, tokens, reason, usage, send, thoughts)
            elif self.error_only is not None:
                await _json(send, 200, {"error": self.error_only})
            else:
                for _ in tokens:
                    await anyio.sleep(self.token_delay)
                await _json(send, 200, self._whole(data["model"], chat, "".join(tokens), reason, usage))
            completed = True
            group.cancel_scope.cancel()

    def _usage(self, prompt: int, completion: int, *, reasoning: int = 0) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cost": prompt * self.price_in + completion * self.price_out,
            "is_byok": False,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "cost_details": {"upstream_inference_cost": None},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "image_tokens": 0},
        }

    def _head(self, model: str, chat: bool, *, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if chat else "text_completion"
        return {
            "id": f"gen-{int(time.time())}-{uuid.uuid4().hex[:20]}",
            "provider": "OpenAI",
            "model": model,
            "object": f"{kind}.chunk" if chunk and chat else kind,
            "created": int(time.time()),
        }

    def _whole(self, model: str, chat: bool, text: str, reason: str, usage: dict[str, Any]) -> dict[str, Any]:
        out = self._head(model, chat, chunk=False)
        if chat:
            choice: dict[str, Any] = {
                "logprobs": None,
                "finish_reason": reason,
                "native_finish_reason": reason,
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "reasoning": self.reasoning,
                },
            }
            if self.reasoning:
                choice["message"]["reasoning_details"] = [self._detail(self.reasoning)]
            if self.annotations:
                choice["message"]["annotations"] = self.annotations
        else:
            choice = {
                "logprobs": None,
                "finish_reason": reason,
                "native_finish_reason": reason,
                "index": 0,
                "text": text,
            }
        if self.error_in_body:
            out["error"] = (
                self.error_in_body
                if isinstance(self.error_in_body, dict)
                else {
                    "code": 502,
                    "message": "Provider returned error",
                    "metadata": {"provider_name": "OpenAI"},
                }
            )
            choice["finish_reason"] = "error"
        out["choices"] = [choice]
        out["usage"] = usage
        return out

    @staticmethod
    def _detail(text: str) -> dict[str, Any]:
        return {"type": "reasoning.text", "text": text, "format": "unknown", "index": 0}

    def _piece(
        self, head: dict[str, Any], chat: bool, text: str, reason: str | None, *, first: bool
    ) -> dict[str, Any]:
        if chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice.update({"finish_reason": reason, "native_finish_reason": reason, "logprobs": None})
        return {**head, "choices": [choice]}

    async def _stream(
        self,
        model: str,
        chat: bool,
        tokens: list[str],
        reason: str,
        usage: dict[str, Any],
        send: Any,
        thoughts: list[str],
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )

        async def emit(raw: bytes) -> None:
            await send({"type": "http.response.body", "body": raw, "more_body": True})

        for _ in range(self.processing_comments):
            await emit(b": OPENROUTER PROCESSING\n\n")
        head = self._head(model, chat, chunk=True)
        for thought in thoughts:  # as OpenRouter streams them: empty content, the reasoning beside it
            delta = {
                "role": "assistant",
                "content": "",
                "reasoning": thought,
                "reasoning_details": [self._detail(thought)],
            }
            await emit(_sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
        for index, token in enumerate(tokens):
            if self.break_after is not None and index >= self.break_after:
                raise RuntimeError("fake OpenRouter: connection dropped mid-stream")
            if self.error_after is not None and index >= self.error_after:
                event = self._piece(head, chat, "", "error", first=False)
                event["error"] = {"code": "server_error", "message": "Provider disconnected unexpectedly"}
                await emit(_sse(event))
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await anyio.sleep(self.token_delay)
            await emit(_sse(self._piece(head, chat, token, None, first=index == 0)))
        last = self._piece(head, chat, "", reason, first=not tokens)
        if self.annotations and chat:
            last["choices"][0]["delta"]["annotations"] = self.annotations
        await emit(_sse(last))
        await emit(_sse({**head, "choices": [], "usage": usage}))
        await emit(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _json(send: Any, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", b"application/json")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": json.dumps(obj).encode()})


async def _error(
    send: Any,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    error: dict[str, Any] = {"code": status, "message": message}
    if metadata is not None:
        error["metadata"] = metadata
    await _json(send, status, {"error": error}, headers)
