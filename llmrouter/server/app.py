"""The Litestar application factory and its lifespan.

``create_app()`` builds the OpenAI-compatible service around a
:class:`~llmrouter.router.Router`. The router and the extensions are long-lived: the
lifespan starts them (extensions first, so that their hooks and cache are ready when the
router starts) and closes them in reverse order; handlers reach them through the
app's state (:func:`~llmrouter.server.state.service_of`).
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.exceptions import HTTPException, MethodNotAllowedException
from litestar.openapi import OpenAPIConfig

from llmrouter.aio import on_asyncio
from llmrouter.config import Config, load_config
from llmrouter.discovery import resolve_config
from llmrouter.errors import one_line_cause
from llmrouter.extension import Extension
from llmrouter.server.chat import chat_handlers
from llmrouter.server.completions import completion_handlers
from llmrouter.server.cors import refuse_foreign_origins
from llmrouter.server.dashboard import dashboard_handlers
from llmrouter.server.disconnect import ClientDisconnected
from llmrouter.server.errors import exception_handlers
from llmrouter.server.head import allow_head_in_405, answer_head_as_get
from llmrouter.server.health import liveness, readiness
from llmrouter.server.middleware import RequestIdMiddleware
from llmrouter.server.models import model_handlers
from llmrouter.server.state import STATE_KEY, Service

if TYPE_CHECKING:
    from litestar import Request, Response

    from llmrouter.hooks import RouterHooks
    from llmrouter.router import Router

__all__ = [
    "RESOLVED_CONFIG_ENV",
    "StartupError",
    "config_from_env",
    "create_app",
    "create_app_from_env",
    "default_extensions",
]

logger = logging.getLogger("llmrouter.server")

RESOLVED_CONFIG_ENV = "LLMROUTER_RESOLVED_CONFIG"
"""JSON of a resolved :class:`Config`, how ``llmrouter serve --workers N`` hands the
config it loaded and discovered to each worker process."""

# Optional subsystems, in request-path order (auth/limits, then cache, then telemetry).
# Each may expose ``extension_from_config(config) -> Extension | None``.
_EXTENSION_MODULES = ("llmrouter.accounting", "llmrouter.cache", "llmrouter.telemetry")

_EXPOSED_HEADERS = [
    "x-request-id",
    "x-process-time",
    "x-llmrouter-deployment",
    "x-llmrouter-model-group",
    "x-llmrouter-cache",
    "x-llmrouter-cost",
    "x-llmrouter-attempts",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-should-retry",
    "retry-after",
]


def default_extensions(config: Config) -> list[Extension]:
    """The extensions that the installed subsystems build from ``config`` (may be none)."""
    extensions: list[Extension] = []
    for module_name in _EXTENSION_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        factory = getattr(module, "extension_from_config", None)
        if factory is None:
            continue
        extension = factory(config)
        if extension is not None:
            extensions.append(extension)
    return extensions


def _build_router(config: Config) -> Router:
    from llmrouter.router import Router

    return Router.from_config(config)


def _attach_extensions(router: Router, extensions: Sequence[Extension], attached: list[RouterHooks]) -> None:
    """Put the extensions' hooks and cache into ``router``, in place of the hooks an
    earlier run of the lifespan put there (``attached``, updated): a lifespan run twice
    (two ``with TestClient(app)`` blocks) would otherwise call each hook twice per
    request, and keep hooks whose stores closed (accounting makes new ones per start)."""
    earlier = {id(hook) for hook in attached}
    router.hooks[:] = [hook for hook in router.hooks if id(hook) not in earlier]
    attached.clear()
    for ext in extensions:
        attached.extend(ext.router_hooks())
        cache = ext.cache_layer()
        if cache is not None:
            router.cache = cache
        ext.attach(router)
    router.hooks.extend(attached)


SETTLE_SECONDS = 10.0
"""At shutdown, the longest wait for requests still in flight to finish before the
extensions close (uvicorn has cancelled them by then: at the end of the drain, or at
once on a second Ctrl-C)."""

CLOSE_MARGIN_SECONDS = 15.0
"""What the shutdown may take beyond :data:`SETTLE_SECONDS` and the ledger's
``shutdown_timeout``: the stores' closing (``accounting.facade.CLOSE_SECONDS`` before the
ledger's flush and again after it), the router's, the telemetry's."""


class StartupError(Exception):
    """The service could not start; the message says which part and why, in one line."""


def shutdown_bound(config: Config) -> float:
    """The longest the app's shutdown takes, from uvicorn's ``lifespan.shutdown`` (after
    the drain) to its end; :func:`_make_lifespan` gives up on what is still running
    then, so that a store that stopped answering cannot hold the process."""
    ledger = config.accounting.ledger.shutdown_timeout if config.accounting.enabled else 0.0
    return SETTLE_SECONDS + ledger + CLOSE_MARGIN_SECONDS


def _make_lifespan(service: Service, owns_router: bool) -> Any:
    attached: list[RouterHooks] = []  # the extensions' hooks in the router, from the last start

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        stack = AsyncExitStack()
        try:
            await _start(service, stack, owns_router, attached)
            # Closed first at shutdown: requests cancelled there still record their rows.
            stack.push_async_callback(service.in_flight.wait_idle, SETTLE_SECONDS)
            if service.config.server.gc_tuning:
                tune_gc()
            yield
        finally:
            await _close(stack, shutdown_bound(service.config))

    return lifespan


async def _close(stack: AsyncExitStack, bound: float) -> None:
    """Close what started (``stack``), for at most ``bound`` seconds: each part bounds its
    own waits, this is the last resort. Errors raise as they would from the stack."""
    if not on_asyncio():  # trio: cancelled in place at the bound
        with anyio.CancelScope(shield=True), anyio.move_on_after(bound):
            await stack.aclose()
        return
    closing = asyncio.get_running_loop().create_task(stack.aclose(), name="llmrouter-shutdown")
    with anyio.CancelScope(shield=True):  # a cancelled lifespan still closes, within the bound
        await asyncio.wait({closing}, timeout=bound)
        if not closing.done():
            logger.error("shutdown still not done after %gs; exiting without waiting for the rest", bound)
            closing.cancel()
            await asyncio.wait({closing}, timeout=1.0)
            if not closing.done():
                return
    if not closing.cancelled():
        closing.result()


async def _start(
    service: Service, stack: AsyncExitStack, owns_router: bool, attached: list[RouterHooks]
) -> None:
    """Start the extensions, then the router, registering their closing on ``stack``
    (``attached``: see :func:`_attach_extensions`).

    Raises:
        StartupError: naming the part that failed and the innermost cause.
    """
    part = "the router"
    try:
        for ext in service.extensions:
            part = ext.name
            # Registered before startup: an extension that half-started still closes.
            stack.push_async_callback(ext.shutdown)
            await ext.startup()
        part = "the router"
        if service.router is None:
            config, notes = await resolve_config(service.config)
            service.config, service.discovery_notes = config, notes
            for line in notes:
                logger.info("discovery: %s", line)
            service.router = _build_router(config)
        router = service.router
        _attach_extensions(router, service.extensions, attached)
        if owns_router:
            stack.push_async_callback(router.aclose)
        await router.start()
    except Exception as exc:
        raise StartupError(f"{part} failed to start: {one_line_cause(exc)}") from exc


GC_YOUNG_THRESHOLD = 10_000
"""Allocations between collections of the youngest generation (CPython's default: 700)."""


def tune_gc() -> None:
    """Garbage-collector settings for a long-running service, applied once it started.

    Everything alive after start-up (modules, the router, loaded models) goes to the
    permanent generation, so full collections stop walking it again and again; young
    collections run every 10,000 allocations instead of 700. Together ~20% less CPU per
    request with accounting, cache and metrics on (docs/benchmarks.md). Objects of a
    request are freed by reference counting either way; only cycles wait longer.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def _handle_disconnect(request: Request[Any, Any, Any], exc: ClientDisconnected) -> Response[bytes]:
    from litestar import Response

    # Nobody is listening any more; the server drops this. 499 as nginx logs it.
    return Response(content=b"", status_code=499)


def create_app(
    config: Config | None = None,
    *,
    router: Router | None = None,
    extensions: Sequence[Extension] = (),
) -> Litestar:
    """Build the OpenAI-compatible service.

    Args:
        config: the configuration; defaults to ``Config()`` (zero-config discovery).
        router: a router to serve (embedded use, tests); by default one is built from
            ``config`` in the lifespan, after discovery when ``config.models`` is empty.
            A router passed in is started by the app but closed by its owner.
        extensions: subsystems (accounting, cache, telemetry) to mount: their hooks and
            cache layer go into the router, their routes and middleware into the app.

    Returns:
        The Litestar application; serve it with any ASGI server.
    """
    config = config or Config()
    service = Service(config=config, router=router, extensions=tuple(extensions))
    handlers: list[Any] = [
        *chat_handlers,
        *completion_handlers,
        *model_handlers,
        liveness,
        readiness,
    ]
    handlers.extend(dashboard_handlers)  # the usage page (static; it calls the accounting API)
    gauges = {name: gauge for ext in service.extensions for name, gauge in ext.gauges().items()}
    for ext in service.extensions:
        ext.export_gauges(gauges)
    observers = [observe for ext in service.extensions for observe in ext.response_observers()]
    middleware: list[Any] = [RequestIdMiddleware(observers, service.in_flight)]
    for ext in service.extensions:
        handlers.extend(ext.route_handlers())
        middleware.extend(ext.middleware())
    origins = config.server.cors_origins
    app = Litestar(
        route_handlers=handlers,
        exception_handlers={
            **exception_handlers,
            MethodNotAllowedException: allow_head_in_405(exception_handlers[HTTPException]),
            ClientDisconnected: _handle_disconnect,
        },
        middleware=middleware,
        cors_config=CORSConfig(allow_origins=origins, expose_headers=_EXPOSED_HEADERS) if origins else None,
        request_max_body_size=config.server.max_request_bytes,
        lifespan=[_make_lifespan(service, owns_router=router is None)],
        state=State({STATE_KEY: service}),
        openapi_config=OpenAPIConfig(title="llmrouter", version=_version(), path="/schema"),
        logging_config=None,
    )
    app.asgi_handler = answer_head_as_get(app.asgi_handler)  # in front of the router
    # In front of everything; the configured host is a name of this machine's too.
    app.asgi_handler = refuse_foreign_origins(app.asgi_handler, origins, own_names=[config.server.host])
    return app


def config_from_env() -> Config:
    """The resolved config from ``LLMROUTER_RESOLVED_CONFIG`` (JSON), else the one
    ``LLMROUTER_CONFIG`` (a YAML path) names, else the defaults."""
    raw = os.environ.get(RESOLVED_CONFIG_ENV)
    if raw:
        return msgspec.json.decode(raw, type=Config)
    return load_config(os.environ.get("LLMROUTER_CONFIG") or None)


def create_app_from_env() -> Litestar:
    """App factory for ``uvicorn --factory``, from :func:`config_from_env`."""
    config = config_from_env()
    return create_app(config, extensions=default_extensions(config))


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llmrouter")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0"
