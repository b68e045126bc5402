"""Behaviours, records and reply planning for the fake upstream (:mod:`llmrouter.testing.upstream`).

Replies are deterministic:
the reply text is split into word "tokens" (a word and the whitespace before it), so
``max_tokens``, stop strings and usage behave like a real server's, reproducibly.

How a request is answered is a :class:`Behaviour`, chosen per request in this order:
the ``x-fake-behaviour`` header (a preset name or a JSON object of Behaviour fields),
the queue of scripted behaviours, the per-model behaviours, the server defaults.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec

__all__ = ["PRESETS", "Behaviour", "Plan", "RecordedRequest", "UpstreamState", "plan_reply"]

DEFAULT_REPLY = "This is a fake reply from the llmrouter test upstream."
_TOKEN = re.compile(r"\s*\S+|\s+")  # a word with the spaces before it; trailing spaces
_json_encode = msgspec.json.encode
_json_decoder = msgspec.json.Decoder()
_MAX_DELAY_S = 300.0
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_JSON_HEADERS = [(b"content-type", b"application/json")]


class Behaviour(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to answer one request. Every field left at None falls back to the server's default.

    Delays are in milliseconds. ``break_after`` closes the connection after that many
    content chunks (for a non-streaming request: before any response). ``error_after``
    sends an ``{"error": ...}`` SSE event after that many content chunks and ends the stream.
    """

    status: int = 200
    error_message: str = "fake upstream error"
    error_type: str | None = None
    error_code: str | None = None
    retry_after: str | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    reply: str | None = None
    chunks: int | None = None
    delay_ms: float | None = None
    first_byte_delay_ms: float | None = None
    break_after: int | None = None
    error_after: int | None = None
    omit_usage: bool = False
    tool_call: bool = False
    invalid_json: bool = False
    ignore_stream: bool = False
    """Answer a stream request with one JSON object, as servers that ignore ``stream`` do."""
    name: str = ""


PRESETS: dict[str, Behaviour] = {
    "rate_limit": Behaviour(
        status=429,
        error_type="rate_limit_error",
        error_code="rate_limit_exceeded",
        error_message="slow down",
        retry_after="2",
    ),
    "server_error": Behaviour(status=500, error_type="server_error", error_message="boom"),
    "unavailable": Behaviour(
        status=503, error_type="server_error", error_message="overloaded", retry_after="1"
    ),
    "bad_request": Behaviour(status=400, error_type="invalid_request_error", error_message="bad field"),
    "context_length": Behaviour(
        status=400,
        error_type="invalid_request_error",
        error_code="context_length_exceeded",
        error_message="prompt too long",
    ),
    "unauthorized": Behaviour(
        status=401, error_type="authentication_error", error_code="invalid_api_key", error_message="bad key"
    ),
    "not_found": Behaviour(
        status=404,
        error_type="invalid_request_error",
        error_code="model_not_found",
        error_message="no such model",
    ),
    "break_stream": Behaviour(break_after=2),
    "error_event": Behaviour(error_after=2, error_message="engine died", error_type="server_error"),
    "no_usage": Behaviour(omit_usage=True),
    "slow_first_byte": Behaviour(first_byte_delay_ms=3000),
    "hang": Behaviour(first_byte_delay_ms=_MAX_DELAY_S * 1000),
    "slow_stream": Behaviour(delay_ms=200, chunks=50),
    "tool_call": Behaviour(tool_call=True),
    "invalid_json": Behaviour(invalid_json=True),
    "ignore_stream": Behaviour(ignore_stream=True),
}
"""Named behaviours for the ``x-fake-behaviour`` header and ``model_behaviours``."""

for _name, _behaviour in PRESETS.items():
    _behaviour.name = _name


@dataclass
class RecordedRequest:
    """One request the fake upstream received, and how its connection ended."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    """``time.monotonic()`` when the request body had been read."""
    behaviour: str = ""
    disconnected_at: float | None = None
    """``time.monotonic()`` when the client closed the connection before the response ended."""
    completed_at: float | None = None
    """``time.monotonic()`` when the whole response had been sent."""
    chunks_sent: int = 0
    client: str = ""
    """The client's ``host:port``: equal for requests that reused one pooled connection."""

    @property
    def json(self) -> Any:
        return _json_decoder.decode(self.body) if self.body else None

    @property
    def disconnected(self) -> bool:
        return self.disconnected_at is not None

    async def wait_disconnected(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109 - polls another thread
        """Wait (from any event loop) until the client went away or the response ended."""
        deadline = time.monotonic() + timeout
        while self.disconnected_at is None and self.completed_at is None:
            if time.monotonic() > deadline:
                return False
            await _any_sleep(0.002)
        return self.disconnected_at is not None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "body"}
        data["json"] = (
            self.json if self.headers.get("content-type", "").startswith("application/json") else None
        )
        return data


async def _any_sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)


@dataclass
class UpstreamState:
    """Configuration and records shared by the app and its owner (thread-safe enough for tests)."""

    reply: str | None = None
    chunks: int | None = None
    delay_ms: float = 0.0
    first_byte_delay_ms: float = 0.0
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    model_behaviours: dict[str, Behaviour | str] = field(default_factory=dict)
    api_key: str | None = None
    strict_models: bool = False
    record: bool = True
    requests: list[RecordedRequest] = field(default_factory=list)
    queue: deque[Behaviour] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closing: bool = False

    def pick(self, header: str | None, model: str) -> Behaviour:
        if header:
            return _parse_behaviour(header)
        with self.lock:
            if self.queue:
                return self.queue.popleft()
        chosen = self.model_behaviours.get(model)
        if chosen is not None:
            return PRESETS[chosen] if isinstance(chosen, str) else chosen
        return _DEFAULT


_DEFAULT = Behaviour()


def _parse_behaviour(value: str) -> Behaviour:
    value = value.strip()
    if value.startswith("{"):
        return msgspec.json.decode(value.encode(), type=Behaviour)
    try:
        return PRESETS[value]
    except KeyError:
        raise ValueError(f"unknown fake behaviour {value!r} (known: {', '.join(PRESETS)})") from None


# --- reply text ------------------------------------------------------------------------------


def _last_user_text(body: dict[str, Any]) -> str:
    if "prompt" in body:
        prompt = body["prompt"]
        return prompt if isinstance(prompt, str) else str(prompt[0]) if prompt else ""
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _prompt_tokens(body: dict[str, Any]) -> int:
    if "prompt" in body:
        return max(1, len(_TOKEN.findall(_last_user_text(body))))
    total = 3
    for message in body.get("messages") or []:
        content = message.get("content")
        text = content if isinstance(content, str) else _json_encode(content).decode() if content else ""
        total += 3 + len(_TOKEN.findall(text))
    return total


def _stop_list(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if not stop:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


@dataclass
class Plan:
    """What one reply will contain: the content pieces, the finish reason, the usage."""

    pieces: list[str]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def plan_reply(state: UpstreamState, behaviour: Behaviour, body: dict[str, Any]) -> Plan:
    """Split the reply into chunks, honouring ``max_tokens`` and stop strings like a real server."""
    template = behaviour.reply if behaviour.reply is not None else state.reply
    n_chunks = behaviour.chunks if behaviour.chunks is not None else state.chunks
    if template is None:
        text = DEFAULT_REPLY
        if n_chunks:
            words = _TOKEN.findall(DEFAULT_REPLY)
            text = "".join(words[i % len(words)] for i in range(max(n_chunks, len(words)))).strip()
    else:
        text = template.replace("{last_user}", _last_user_text(body)).replace(
            "{model}", str(body.get("model"))
        )
    tokens = _TOKEN.findall(text) or ([text] if text else [])
    finish = "stop"
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is None and "prompt" in body:
        limit = 16  # OpenAI's (and vLLM's) default for /v1/completions
    if isinstance(limit, int) and 0 < limit < len(tokens):
        tokens, finish = tokens[:limit], "length"
    stops = _stop_list(body)
    if stops:
        joined = "".join(tokens)
        cut = min((i for i in (joined.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            tokens, finish = _TOKEN.findall(joined[:cut]) or ([joined[:cut]] if joined[:cut] else []), "stop"
    completion_tokens = len(tokens)
    if n_chunks and n_chunks < len(tokens):
        size, extra = divmod(len(tokens), n_chunks)
        pieces, start = [], 0
        for i in range(n_chunks):
            end = start + size + (1 if i < extra else 0)
            pieces.append("".join(tokens[start:end]))
            start = end
    else:
        pieces = tokens
    return Plan(pieces, finish, _prompt_tokens(body), completion_tokens)


def usage_dict(plan: Plan) -> dict[str, int]:
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.completion_tokens,
        "total_tokens": plan.prompt_tokens + plan.completion_tokens,
    }


def error_body(behaviour: Behaviour) -> bytes:
    return _json_encode(
        {
            "error": {
                "message": behaviour.error_message,
                "type": behaviour.error_type or "error",
                "code": behaviour.error_code,
                "param": None,
            }
        }
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
