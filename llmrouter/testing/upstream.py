"""A fake OpenAI-compatible upstream: a real HTTP server on 127.0.0.1 for tests and benchmarks.

In-process, served by uvicorn in a background thread::

    with FakeUpstream(reply="Echo: {last_user}", chunks=5) as up:
        client = httpx.Client(base_url=up.base_url)       # http://127.0.0.1:PORT/v1
        ...
        assert up.requests[-1].json["model"] == "fake-model"

As a subprocess (benchmarks, service tests)::

    python -m llmrouter.testing.upstream --port 9100 --chunks 20 --delay-ms 0

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON, or SSE ending
with ``data: [DONE]``; the usage chunk comes when ``stream_options.include_usage``),
``GET /v1/models``, ``GET /health``. Control endpoints for a subprocess:
``GET /_fake/requests`` (the records as JSON), ``POST /_fake/script`` (queue behaviours:
a preset name, a Behaviour object, or a list of them), ``POST /_fake/reset``.

Per-request behaviour (error injection) comes from the ``x-fake-behaviour`` header (a
name from :data:`PRESETS` or a JSON :class:`Behaviour`), the queue (:meth:`FakeUpstream.enqueue`),
or ``model_behaviours`` (by request model name). Reply templates may use ``{last_user}``
(the last user message, or the prompt) and ``{model}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from llmrouter.testing._fake_asgi import FakeOpenAIApp
from llmrouter.testing._fake_behaviour import PRESETS, Behaviour, RecordedRequest, UpstreamState

__all__ = ["PRESETS", "Behaviour", "FakeUpstream", "RecordedRequest", "build_app", "uvicorn_config"]


def build_app(
    *,
    reply: str | None = None,
    chunks: int | None = None,
    delay_ms: float = 0.0,
    first_byte_delay_ms: float = 0.0,
    models: Iterable[str] = ("fake-model",),
    model_behaviours: Mapping[str, Behaviour | str] | None = None,
    api_key: str | None = None,
    strict_models: bool = False,
    record: bool = True,
) -> FakeOpenAIApp:
    """The bare ASGI app, for serving it with any ASGI server (see :class:`FakeUpstream` for the args)."""
    for value in (model_behaviours or {}).values():
        if isinstance(value, str) and value not in PRESETS:
            raise ValueError(f"unknown fake behaviour {value!r} (known: {', '.join(PRESETS)})")
    state = UpstreamState(
        reply=reply,
        chunks=chunks,
        delay_ms=delay_ms,
        first_byte_delay_ms=first_byte_delay_ms,
        models=list(models),
        model_behaviours=dict(model_behaviours or {}),
        api_key=api_key,
        strict_models=strict_models,
        record=record,
    )
    return FakeOpenAIApp(state)


def uvicorn_config(app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Any:
    """A uvicorn config on the fastest loop and parser installed (uvloop, httptools)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="off",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=1,
        timeout_keep_alive=30,
    )


class FakeUpstream:
    """The fake upstream served by uvicorn in a daemon thread (a context manager, sync or async).

    Args:
        reply: reply text (template with ``{last_user}`` / ``{model}``); a fixed sentence by default.
        chunks: content chunks per streamed reply (the text is split into this many pieces;
            the default sentence is lengthened to have at least this many words).
        delay_ms: delay before each content chunk after the first (and, per chunk, before a
            non-streamed answer).
        first_byte_delay_ms: delay before the response headers.
        models: what ``GET /v1/models`` lists.
        model_behaviours: a behaviour (or preset name) for requests naming a model.
        api_key: when set, ``/v1`` requests need ``Authorization: Bearer <api_key>``.
        strict_models: answer 404 ``model_not_found`` for models not in ``models``.
        port: 0 picks a free port.
        record: keep :attr:`requests` (turn off for long benchmarks).
    """

    def __init__(
        self,
        *,
        reply: str | None = None,
        chunks: int | None = None,
        delay_ms: float = 0.0,
        first_byte_delay_ms: float = 0.0,
        models: Iterable[str] = ("fake-model",),
        model_behaviours: Mapping[str, Behaviour | str] | None = None,
        api_key: str | None = None,
        strict_models: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
        log_level: str = "warning",
    ) -> None:
        self.app = build_app(
            reply=reply,
            chunks=chunks,
            delay_ms=delay_ms,
            first_byte_delay_ms=first_byte_delay_ms,
            models=models,
            model_behaviours=model_behaviours,
            api_key=api_key,
            strict_models=strict_models,
            record=record,
        )
        self.state = self.app.state
        self._host, self._port, self._log_level = host, port, log_level
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        """Start serving; returns once the server accepts connections."""
        if self._thread is not None:
            return self
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        self._port = sock.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn_config(self.app, host=self._host, port=self._port, log_level=self._log_level)
        )
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [sock]},
            name=f"fake-upstream-{self._port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake upstream did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stop serving: open requests are cancelled after a one-second grace period."""
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeUpstream:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc_info: object) -> None:
        import anyio.to_thread

        await anyio.to_thread.run_sync(self.stop)

    # --- addresses --------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://{self._host}:{self._port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    # --- scripting and records --------------------------------------------------------

    def enqueue(self, *behaviours: Behaviour | str) -> None:
        """Answer the next requests (one each, in order) with these behaviours or preset names."""
        parsed = [PRESETS[b] if isinstance(b, str) else b for b in behaviours]
        with self.state.lock:
            self.state.queue.extend(parsed)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far (control endpoints excluded), oldest first."""
        return self.state.requests

    @property
    def last_request(self) -> RecordedRequest:
        if not self.state.requests:
            raise LookupError("the fake upstream has received no request")
        return self.state.requests[-1]

    def generation_requests(self) -> list[RecordedRequest]:
        """The chat and completion requests received (health checks and model lists left out)."""
        return [r for r in self.state.requests if r.path.endswith("completions")]

    def reset(self) -> None:
        """Forget the recorded requests and drop queued behaviours."""
        self.state.requests.clear()
        with self.state.lock:
            self.state.queue.clear()

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:  # noqa: ASYNC109
        """Wait until at least ``count`` generation requests arrived; returns them."""
        import anyio

        with anyio.fail_after(timeout):
            # The server runs on another thread's loop: poll rather than share an event.
            while len(self.generation_requests()) < count:  # noqa: ASYNC110
                await anyio.sleep(0.002)
        return self.generation_requests()


def main(argv: list[str] | None = None) -> None:
    """Serve the fake upstream in the foreground (``python -m llmrouter.testing.upstream``)."""
    parser = argparse.ArgumentParser(
        prog="python -m llmrouter.testing.upstream", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--reply", default=None, help="reply template ({last_user}, {model})")
    parser.add_argument("--chunks", type=int, default=None, help="content chunks per streamed reply")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay before each chunk after the first")
    parser.add_argument("--first-byte-delay-ms", type=float, default=0.0)
    parser.add_argument("--model", action="append", dest="models", help="a model to list (repeatable)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--strict-models", action="store_true")
    parser.add_argument("--no-record", action="store_true", help="keep no request records (long benchmarks)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    import uvicorn

    app = build_app(
        reply=args.reply,
        chunks=args.chunks,
        delay_ms=args.delay_ms,
        first_byte_delay_ms=args.first_byte_delay_ms,
        models=args.models or ["fake-model"],
        api_key=args.api_key,
        strict_models=args.strict_models,
        record=not args.no_record,
    )
    config = uvicorn_config(app, host=args.host, port=args.port, log_level=args.log_level)
    print(f"fake upstream listening on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
