"""JSON logs on the standard library's ``logging``: one line per request, plus events.

Every record becomes one JSON object: ``timestamp`` (UTC, ISO 8601, ms), ``level``,
``logger``, ``message`` and the record's extra fields. The request line
(logger ``llmrouter.access``, message ``request``) carries::

    request_id, trace_id, method, path, status, latency_ms, model, deployment,
    provider, tokens {prompt, completion, total, estimated}, cost, cache, ttft_ms,
    attempts, fallbacks, error (type, code) - and api_key_id when a key paid.

Behind the service the HTTP middleware writes it once the response is sent (it knows
the status); a library user gets it from :class:`~llmrouter.telemetry.TelemetryHooks`
(without method/path, ``status`` is the router's ``ok``/``error``/``cancelled``).
A plain text handler prints a readable line instead (see :func:`log_request`).
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from llmrouter.telemetry.tracing import trace_id_of

if TYPE_CHECKING:
    from llmrouter.context import RequestContext

__all__ = [
    "ACCESS_LOGGER",
    "HTTP_LINE",
    "LIBRARY_LINE",
    "UNROUTED_LINE",
    "AccessRecord",
    "JsonFormatter",
    "configure_logging",
    "configure_plain_logging",
    "context_fields",
    "current_access_record",
    "log_event",
    "log_request",
]

ACCESS_LOGGER = "llmrouter.access"
ACCESS_MESSAGE = "request"
"""The request line's ``message`` in JSON (what log queries select it by)."""
_JSON_MESSAGE = "_json_message"
"""A record's attribute naming its JSON ``message`` instead of the formatted one (a
field starting with ``_``: never written as a key of its own)."""

# Attributes every LogRecord has; anything else on a record came from ``extra=``
# (``color_message`` is uvicorn's ANSI-coloured copy of the message).
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
# Libraries that log every upstream call at INFO: the request line already says it all.
_CHATTY_LOGGERS = ("httpx", "httpcore", "httpx2")
"""Loggers with a line per HTTP request (httpx2: the openai SDK's client, ``llmrouter chat --url``)."""


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON line (non-JSON values fall back to ``str``)."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.__dict__.get(_JSON_MESSAGE) or record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False, separators=(",", ":"))


class _JsonHandler(logging.StreamHandler):
    """Marks the handler ``configure_logging`` installed, so a second call replaces it."""


def configure_plain_logging() -> None:
    """Plain text lines at INFO on stderr, unless logging is configured already: what the
    CLI sets up, and each worker of ``llmrouter serve --workers N`` too (a worker is a
    process of its own, and without it logged nothing below WARNING). httpx's line per
    upstream request is left out (noise, and ~4% of the CPU on the streaming path)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def configure_logging(level: str = "INFO", *, json_lines: bool = True, stream: IO[str] | None = None) -> None:
    """Make every log record a JSON line at ``level``.

    Plain stream handlers already on the root logger (a CLI's ``basicConfig``) keep their
    stream and get the JSON formatter, so nothing is logged twice; without one, a JSON
    handler on ``stream`` (stderr) is added. A second call replaces the handler this
    function added. Other handlers (files, pytest's capture) are left alone. With
    ``json_lines=False`` only the levels are set.
    """
    root = logging.getLogger()
    root.setLevel(level)
    logging.getLogger("llmrouter").setLevel(level)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    if not json_lines:
        return
    for ours in [h for h in root.handlers if isinstance(h, _JsonHandler)]:
        root.removeHandler(ours)
    plain = [h for h in root.handlers if type(h) is logging.StreamHandler]
    if plain and stream is None:
        for existing in plain:
            existing.setFormatter(JsonFormatter())
    else:
        added = _JsonHandler(stream or sys.stderr)
        added.setFormatter(JsonFormatter())
        root.addHandler(added)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "litestar"):
        # Route the servers' own lines through the root's JSON handler instead of theirs.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


@dataclass(slots=True)
class AccessRecord:
    """What the HTTP middleware knows about the request being served; the hooks attach
    the router's :class:`~llmrouter.context.RequestContext` to it."""

    method: str
    path: str
    request_id: str
    traceparent: str
    ctx: RequestContext | None = None


current_access_record: ContextVar[AccessRecord | None] = ContextVar("llmrouter_access_record", default=None)
"""Set by the HTTP middleware for the duration of one request (None outside the service).

It holds a mutable object, so a hook running in a child task (which sees a copy of the
context) still writes to the record that the middleware will log."""


def context_fields(ctx: RequestContext) -> dict[str, Any]:
    """The request line's fields that come from the router's context."""
    fields: dict[str, Any] = {
        "request_id": ctx.request_id,
        "trace_id": trace_id_of(ctx.traceparent),
        "model": ctx.model_group,
        "deployment": ctx.deployment,
        "provider": ctx.provider,
        "operation": ctx.operation,
        "stream": ctx.stream,
        "latency_ms": _round(ctx.latency_ms),
        "ttft_ms": _round(ctx.ttft_ms),
        "cache": ctx.cache_status,
        "cost": ctx.cost,
        "attempts": ctx.attempts,
        "fallbacks": ctx.fallbacks,
        "outcome": ctx.status,
    }
    if ctx.usage is not None:
        fields["tokens"] = {
            "prompt": ctx.usage.prompt_tokens,
            "completion": ctx.usage.completion_tokens,
            "total": ctx.usage.total_tokens,
            "estimated": ctx.usage.estimated,
        }
    if ctx.api_key_id is not None:
        fields["api_key_id"] = ctx.api_key_id
    if ctx.error is not None:
        fields["error"] = {"type": type(ctx.error).__name__, "code": ctx.error.code}
    return fields


HTTP_LINE = (
    "request %(method)s %(path)s %(status)s %(latency_ms)s ms model=%(model)s request_id=%(request_id)s"
)
"""The service's request line in plain text, e.g.
``request POST /v1/chat/completions 200 12.3 ms model=m request_id=req-42``."""
UNROUTED_LINE = "request %(method)s %(path)s %(status)s %(latency_ms)s ms request_id=%(request_id)s"
"""The same for a request that never reached the router (a 400 before it): no model."""
LIBRARY_LINE = "request %(operation)s %(outcome)s %(latency_ms)s ms model=%(model)s request_id=%(request_id)s"
"""The library's line (:class:`~llmrouter.telemetry.TelemetryHooks`), without HTTP:
``request chat ok 12.3 ms model=m request_id=...``."""


def log_request(logger: logging.Logger, level: int, line: str, fields: dict[str, Any]) -> None:
    """Write the request line with ``fields``: in JSON its ``message`` is ``request`` and
    the fields are keys; a plain text formatter (``%(message)s``, as with
    ``telemetry.json_logs: false``) prints ``line`` (:data:`HTTP_LINE`,
    :data:`UNROUTED_LINE`, :data:`LIBRARY_LINE`) filled from them instead of the bare
    word. Only a handler that prints the text formats it."""
    fields[_JSON_MESSAGE] = ACCESS_MESSAGE
    logger.log(level, line, fields, extra=fields)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def log_event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log a structured event (start-up, shutdown, ...) with ``fields`` as JSON keys."""
    logger.log(level, message, extra={"event": message, **fields})
