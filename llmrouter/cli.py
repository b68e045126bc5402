"""The ``llmrouter`` command line.

::

    llmrouter serve [--config FILE] [--host H] [--port P] [--workers N]
    llmrouter models [--config FILE]
    llmrouter chat [-m MODEL] ["prompt"] [--url URL]     # no prompt: interactive

The config file is ``--config``, else ``$LLMROUTER_CONFIG``, else ``./llmrouter.yaml``
when present, else the defaults (zero-config discovery). Other packages add their own
sub-commands through a ``register(subparsers)`` function in ``llmrouter.accounting.cli``
and ``llmrouter.bench.cli``: each sets ``func`` (``args -> int | None``) on its parsers.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmrouter.config import Config, ModelGroup, load_config
from llmrouter.errors import ConfigError, LLMRouterError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["build_parser", "find_config_path", "main"]

CONFIG_ENV = "LLMROUTER_CONFIG"
DEFAULT_CONFIG_FILE = "llmrouter.yaml"
MODEL_ENV = "LLMROUTER_TRANSFORMERS_MODEL"
"""The model ``serve --model`` names (the transformers provider's discovery reads it)."""
# Sub-commands that live with their subsystem; skipped when it is not installed.
PLUGIN_CLI_MODULES = ("llmrouter.accounting.cli", "llmrouter.bench.cli")


def find_config_path(explicit: str | None = None) -> Path | None:
    """``explicit``, else ``$LLMROUTER_CONFIG``, else ``./llmrouter.yaml`` if it exists."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def _load(args: argparse.Namespace) -> tuple[Config, Path | None]:
    path = find_config_path(getattr(args, "config", None))
    return load_config(path), path


def _resolve(config: Config) -> tuple[Config, list[str]]:
    import anyio

    from llmrouter.discovery import resolve_config

    return anyio.run(resolve_config, config)


def _check_providers(config: Config, path: Path | None = None) -> None:
    """A deployment of a provider that is not installed, or with options its provider does
    not take (``base_ur:``), fails here, in one line, rather than in the app's start-up
    (exit 3, "the router failed to start"); so does a ``providers:`` entry of such a
    provider or option (``ollama: {hots: ...}``), which before made every ``ollama/...``
    request 404. ``models`` fails as ``serve`` would. Building the router builds each
    provider from its options; nothing starts. Errors name the config file ``path``."""
    from llmrouter.router import Router

    try:
        _check_deployment_providers(config)
        _check_provider_defaults(config)
        Router(config)
    except ConfigError as exc:
        message = exc.message.removeprefix("config: ")
        raise ConfigError(f"config: {path}: {message}" if path else f"config: {message}") from exc


def _provider_class(name: str, where: str) -> Any:
    """The class of provider ``name``; not installed or unknown: a config error at ``where``."""
    from llmrouter.registry import load_provider_class

    try:
        return load_provider_class(name)
    except LLMRouterError as exc:
        raise ConfigError(f"config: {exc.message.removeprefix('config: ')} - at `{where}`") from exc


def _check_deployment_providers(config: Config) -> None:
    from llmrouter.registry import available_providers

    installed = set(available_providers())
    for i, group in enumerate(config.models):
        for j, deployment in enumerate(group.deployments):
            if deployment.provider not in installed:
                _provider_class(deployment.provider, f"$.models[{i}].deployments[{j}].provider")


def _check_provider_defaults(config: Config) -> None:
    """Each ``providers:`` entry: a provider that can be loaded, and options it takes."""
    from llmrouter.config import check_options

    for name, options in config.providers.items():
        where = f"$.providers.{name}"
        check_options(_provider_class(name, where).Options, options, where)


def _check_model_path(model: str, source: str) -> None:
    """``serve --model`` takes a directory or a hub id; a value written as a path that does
    not exist is refused here (it started, and the deployment failed to load: 503s). Only
    one starting with ``/``, ``.`` or ``~``: a hub id (``org/name``) is not a path."""
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        raise ConfigError(
            f"{source}: {model} does not exist (give a model directory or a Hugging Face hub id)"
        )


def _version() -> str:
    from llmrouter import __version__

    return __version__


# --- serve ---------------------------------------------------------------------------


def _startup_summary(config: Config, path: Path | None, notes: list[str], extensions: list[str]) -> list[str]:
    from llmrouter.discovery import describe_config

    lines = [f"llmrouter {_version()}"]
    if path is not None:
        lines.append(f"config: {path}")
    else:
        lines.append(f"config: none (defaults; use --config, ${CONFIG_ENV} or ./{DEFAULT_CONFIG_FILE})")
    deployments = sum(len(group.deployments) for group in config.models)
    lines.append(f"models: {len(config.models)} group(s), {deployments} deployment(s)")
    lines += [f"  {line}" for line in describe_config(config)]
    if notes:
        lines.append("discovery:")
        lines += [f"  {note}" for note in notes]
    lines.append(f"extensions: {', '.join(extensions) or 'none'}")
    return lines


def _announce(lines: list[str], *, as_log: bool) -> None:
    """What ``serve`` loaded: plain lines on stdout for a person at a terminal; with JSON
    logs going to a collector, records of the ``llmrouter.serve`` logger, so that every
    line of the service's output parses as JSON."""
    if as_log:
        logger = logging.getLogger("llmrouter.serve")
        for line in lines:
            logger.info(line.strip())
        return
    print("\n".join(lines), flush=True)


def _with_model(config: Config, path: str) -> Config:
    """``config`` with a group for ``serve --model``'s model (the transformers provider's),
    unless a group already has its name."""
    import msgspec

    from llmrouter.registry import load_provider_class

    provider: Any = load_provider_class("transformers")  # its plugin's classmethod
    group: ModelGroup = provider.group_for(path)
    if any(group.name in (g.name, *g.aliases) for g in config.models):
        raise ConfigError(f"serve --model: the config already has a model named {group.name!r}")
    return msgspec.structs.replace(config, models=[*config.models, group])


FORCED_EXIT = 130
"""``serve``'s exit status after a second Ctrl-C (128 + SIGINT, as a shell reports a
process that Ctrl-C ended)."""


def cmd_serve(args: argparse.Namespace) -> int:
    import msgspec
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from llmrouter.server.app import RESOLVED_CONFIG_ENV, create_app, default_extensions
    from llmrouter.server.startup import OneLineStartupFailure

    if args.model:
        # Read by the transformers provider's discovery (zero-config start).
        os.environ[MODEL_ENV] = args.model
    model = os.environ.get(MODEL_ENV, "").strip()
    _check_model_path(model, "serve --model" if args.model else MODEL_ENV)
    config, path = _load(args)
    if model and (config.models or not config.discover):
        config = _with_model(config, model)  # discovery, which reads it, will not run
    _check_providers(config, path)
    config, notes = _resolve(config)
    if not args.access_log:
        config = msgspec.structs.replace(
            config, telemetry=msgspec.structs.replace(config.telemetry, access_log=False)
        )
    from llmrouter.telemetry.logging import configure_logging

    # Before uvicorn starts, so that its own start-up lines are JSON too (when asked).
    configure_logging(config.telemetry.log_level, json_lines=config.telemetry.json_logs)
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    workers = args.workers or config.server.workers
    if workers != config.server.workers:
        # What the workers build from reads it: with several, budgets must be shared
        # (accounting's `auto` store picks the database), not kept in each one's memory.
        config = msgspec.structs.replace(
            config, server=msgspec.structs.replace(config.server, workers=workers)
        )
    try:
        extensions = default_extensions(config)
    except OSError as exc:  # a file or folder an extension needs (the database's are checked at start-up)
        print(f"llmrouter: error: the service cannot start: {exc}", file=sys.stderr)
        return STARTUP_FAILURE
    summary = _startup_summary(config, path, notes, [ext.name for ext in extensions])
    summary.append(f"listening on http://{host}:{port}  (OpenAI base URL: http://{host}:{port}/v1)")
    _announce(summary, as_log=config.telemetry.json_logs and not sys.stdout.isatty())
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": args.log_level,
        "access_log": args.access_log,
        "interface": "asgi3",  # OneLineStartupFailure's __call__ returns the app's coroutine
        "timeout_graceful_shutdown": config.server.drain_seconds,
    }
    if config.telemetry.json_logs:
        # uvicorn's own logging config would give its start-up lines plain-text handlers;
        # without it they reach the root logger's JSON handler like every other line.
        common["log_config"] = None
    if workers > 1:
        # Each worker process builds its own app from the config resolved here, so that
        # discovery runs once and every worker serves the same models.
        os.environ[RESOLVED_CONFIG_ENV] = msgspec.json.encode(config).decode()
        return _serve_workers(workers, common)
    app = OneLineStartupFailure(create_app(config, extensions=extensions))
    uvicorn.run(app, **common)
    # A second Ctrl-C: the requests still running were cut, not drained (docs/service.md).
    return FORCED_EXIT if app.forced_exit else 0


def _supervisor_class() -> type[Any]:
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        """uvicorn's, closing its own copy of the listening socket before it stops the
        workers: kept open, the kernel went on accepting connections through the whole
        drain, which no worker served and which were reset at the end, where one process
        refuses them at once (docs/service.md: a stopping service accepts none)."""

        def terminate_all(self) -> None:
            for sock in self.sockets:
                sock.close()
            super().terminate_all()

    return Supervisor


def _serve_workers(workers: int, options: dict[str, Any]) -> int:
    """``uvicorn.run`` with ``workers``, except for the exit status: a worker that fails
    to start makes it 3, as one process's failure does (uvicorn's exits 0, and a
    supervisor's restart-on-failure would never fire)."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from llmrouter.telemetry.config import METRICS_DIR_ENV

    config = uvicorn.Config(
        "llmrouter.server.startup:serve_app_from_env", factory=True, workers=workers, **options
    )
    supervisor = _supervisor_class()(config, sockets=[config.bind_socket()])
    # Where the workers share their metrics, so that /metrics shows them all.
    with tempfile.TemporaryDirectory(prefix="llmrouter-metrics-") as metrics_dir:
        os.environ[METRICS_DIR_ENV] = metrics_dir
        supervisor.run()
    return STARTUP_FAILURE if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes) else 0


# --- models --------------------------------------------------------------------------


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _deployment_ids(config: Config) -> dict[str, list[str]]:
    """The ids the router gives each group's deployments, as readiness, metrics and the
    ledger show them: the same model twice without an ``id`` is ``remote/m`` and then
    ``remote/m#2``. Building the router builds the providers; none is started."""
    from llmrouter.router import Router

    router = Router(config)
    return {
        name: [deployment.id for deployment in group.deployments] for name, group in router.groups.items()
    }


def cmd_models(args: argparse.Namespace) -> int:
    if args.provider == "openrouter":
        from llmrouter_openrouter.cli import cmd_models as openrouter_models

        args.base_url = getattr(args, "base_url", None) or "https://openrouter.ai/api/v1"
        return int(openrouter_models(args) or 0)
    if args.provider is not None:
        print(
            f"llmrouter: error: --provider supports only 'openrouter' (got {args.provider!r})",
            file=sys.stderr,
        )
        return 2
    config, path = _load(args)
    _check_providers(config, path)  # as serve would: `models` is the quick check of a config
    config, notes = _resolve(config)
    ids = _deployment_ids(config)
    rows = [["MODEL", "ALIASES", "STRATEGY", "DEPLOYMENT", "PROVIDER", "UPSTREAM MODEL"]]
    for group in config.models:
        for index, deployment in enumerate(group.deployments):
            first = index == 0
            rows.append(
                [
                    group.name if first else "",
                    ", ".join(group.aliases) if first else "",
                    (group.strategy or config.router.strategy) if first else "",
                    ids[group.name][index],
                    deployment.provider,
                    deployment.model,
                ]
            )
    if len(rows) > 1:
        print(_table(rows))
    else:
        print("no models configured")
    for note in notes:
        print(f"discovery: {note}")
    return 0


# --- chat ----------------------------------------------------------------------------


class _ChatError(Exception):
    """A chat turn failed (already translated into one printable line)."""


def _chat_request(args: argparse.Namespace, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    request: dict[str, Any] = {"model": model, "messages": messages, "stream": args.stream}
    if args.max_tokens is not None:
        request["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        request["temperature"] = args.temperature
    return request


class _RouterBackend:
    """Chat in-process through a :class:`~llmrouter.router.Router` built from the config."""

    def __init__(self, router: Any) -> None:
        self.router = router

    async def default_model(self) -> str:
        models = (await self.router.list_models()).data
        if not models:
            raise _ChatError("no models configured or discovered (see `llmrouter models`)")
        return models[0].id

    async def reply(self, request: dict[str, Any]) -> Any:
        try:
            if request["stream"]:
                async for chunk in self.router.stream(request):
                    for choice in chunk.choices:
                        if choice.delta.content:
                            yield choice.delta.content
            else:
                response = await self.router.chat(request)
                yield response.choices[0].message.content or ""
        except LLMRouterError as exc:
            raise _ChatError(exc.message) from exc


class _HTTPBackend:
    """Chat with a running server through the official ``openai`` client."""

    def __init__(self, url: str, api_key: str | None) -> None:
        try:
            import openai
        except ImportError as exc:
            raise _ChatError(
                "`chat --url` talks to the server with the openai package: pip install openai"
            ) from exc

        base_url = url.rstrip("/")
        if not base_url.endswith("/v1"):
            base_url += "/v1"
        key = api_key or os.environ.get("LLMROUTER_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)

    async def default_model(self) -> str:
        with self._errors():
            async for model in self.client.models.list():
                return str(model.id)
        raise _ChatError("the server lists no models")

    async def reply(self, request: dict[str, Any]) -> Any:
        with self._errors():
            if request["stream"]:
                stream = await self.client.chat.completions.create(**request)
                async for chunk in stream:
                    for choice in chunk.choices:
                        if choice.delta.content:
                            yield choice.delta.content
            else:
                response = await self.client.chat.completions.create(**request)
                yield response.choices[0].message.content or ""

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """The server's refusals and connection failures as one-line errors."""
        import openai

        try:
            yield
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            message = body.get("message") or (body.get("error") or {}).get("message") or str(exc)
            raise _ChatError(f"{exc.status_code}: {message}") from exc
        except openai.APIConnectionError as exc:
            raise _ChatError(f"cannot reach {self.client.base_url}: {exc}") from exc


async def _chat_turn(
    backend: Any, args: argparse.Namespace, model: str, messages: list[dict[str, str]]
) -> str:
    pieces = []
    async for piece in backend.reply(_chat_request(args, model, messages)):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces)


async def _chat_session(backend: Any, args: argparse.Namespace) -> int:
    import anyio.to_thread

    model = args.model or await backend.default_model()
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        await _chat_turn(backend, args, model, [*history, {"role": "user", "content": prompt}])
        return 0
    print(f"chatting with {model} (empty line skipped; /exit or Ctrl-D quits)", file=sys.stderr)
    while True:
        try:
            line = await anyio.to_thread.run_sync(input, "> ")
        except EOFError:
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        turn = [*history, {"role": "user", "content": line}]
        try:
            answer = await _chat_turn(backend, args, model, turn)
        except _ChatError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        history = [*turn, {"role": "assistant", "content": answer}]


async def _chat_main(args: argparse.Namespace) -> int:
    if args.url:
        backend = _HTTPBackend(args.url, args.api_key)
        # Closed here, in this event loop: left to the garbage collector, the openai client
        # schedules its closing on whatever loop is running then, with sockets of this one.
        async with backend.client:
            return await _chat_session(backend, args)
    from llmrouter.discovery import resolve_config
    from llmrouter.router import Router

    config, _ = _load(args)
    config, _notes = await resolve_config(config)
    async with Router(config) as router:
        return await _chat_session(_RouterBackend(router), args)


def cmd_chat(args: argparse.Namespace) -> int:
    import anyio

    try:
        return anyio.run(_chat_main, args)
    except _ChatError as exc:
        print(f"llmrouter: error: {exc}", file=sys.stderr)
        return 1


# --- parser --------------------------------------------------------------------------


def _number(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number from ``low`` to ``high`` (``nan`` and ``inf`` refused: a
    request body cannot carry them)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # False for nan
            raise argparse.ArgumentTypeError(f"expected a number from {low:g} to {high:g}, not {text!r}")
        return value

    return parse


def _whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high`` (argparse reports the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, not {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with the sub-commands of installed subsystems."""
    parser = argparse.ArgumentParser(prog="llmrouter", description="A pluggable multi-provider LLM router.")
    parser.add_argument("--version", action="version", version=f"llmrouter {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP service")
    serve.add_argument(
        "--config", "-c", help=f"config file (default: ${CONFIG_ENV} or ./{DEFAULT_CONFIG_FILE})"
    )
    serve.add_argument("--host", help="bind address (default: server.host, 127.0.0.1)")
    serve.add_argument("--port", type=_whole_number(0, 65535), help="port (default: server.port, 8000)")
    serve.add_argument(
        "--workers", type=_whole_number(1, 1024), help="worker processes (default: server.workers, 1)"
    )
    serve.add_argument(
        "--model",
        metavar="DIR_OR_HUB_ID",
        help="also serve this Hugging Face model in-process, beside the config's models or the discovered ones",
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.add_argument(
        "--no-access-log", dest="access_log", action="store_false", help="no per-request log lines"
    )
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="list model groups and their deployments")
    models.add_argument("--config", "-c", help="config file")
    models.add_argument(
        "--provider", help="list what a provider offers instead (openrouter: models with prices)"
    )
    models.add_argument(
        "--write-pricing", metavar="FILE", help="with --provider openrouter: merge its prices into FILE"
    )
    models.add_argument(
        "--json", action="store_true", help="with --provider openrouter: the price table as JSON"
    )
    models.set_defaults(func=cmd_models)

    chat = sub.add_parser("chat", help="talk to a model (one prompt, or interactive without one)")
    chat.add_argument("prompt", nargs="?", help="the message; omit for an interactive session")
    chat.add_argument("-m", "--model", help="model name (default: the first configured model)")
    chat.add_argument("--config", "-c", help="config file (in-process mode)")
    chat.add_argument("--url", help="talk to a running llmrouter/OpenAI server at this base URL instead")
    chat.add_argument("--api-key", help="API key for --url (default: $LLMROUTER_API_KEY or $OPENAI_API_KEY)")
    chat.add_argument("--system", "-s", help="system prompt")
    chat.add_argument("--max-tokens", type=int, help="most tokens to generate")
    chat.add_argument("--temperature", "-t", type=_number(0, 2), help="sampling temperature (0 to 2)")
    chat.add_argument("--no-stream", dest="stream", action="store_false", help="wait for the whole answer")
    chat.set_defaults(func=cmd_chat)

    for module_name in PLUGIN_CLI_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llmrouter`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    from llmrouter.telemetry.logging import configure_plain_logging

    configure_plain_logging()
    try:
        return int(func(args) or 0)
    except LLMRouterError as exc:
        print(f"llmrouter: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
