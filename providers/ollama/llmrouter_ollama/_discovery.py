"""Zero-config discovery: find an Ollama daemon and register each of its models.

Naming (also in docs/providers/ollama.md): a model listed by ``/api/tags`` as
``llama3.2:latest`` becomes the group ``ollama/llama3.2`` with the aliases
``llama3.2``, ``llama3.2:latest`` and ``ollama/llama3.2:latest``; a model with
another tag, ``qwen2.5:0.5b``, becomes ``ollama/qwen2.5:0.5b`` with the alias
``qwen2.5:0.5b``. So clients can use the names they use with Ollama itself, and the
``ollama/`` prefix when another provider serves a model of the same name.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

import httpx
import ollama

from llmrouter.config import Deployment, ModelGroup

__all__ = ["DEFAULT_HOST", "DiscoveryResult", "groups_for", "probe", "resolve_host"]

DEFAULT_HOST = "http://127.0.0.1:11434"
PROBE_TIMEOUT = 0.5


def resolve_host(host: str | None = None) -> str:
    """The daemon's base URL: ``host``, else ``OLLAMA_HOST``, else the default port on loopback.

    Accepts the ``ollama`` CLI's shorthand: ``0.0.0.0``, ``:11435``, ``box:11434``,
    ``https://box``; without a scheme the port defaults to 11434.
    """
    raw = (host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST).strip().rstrip("/")
    has_scheme = "://" in raw
    if raw.startswith(":"):
        raw = f"127.0.0.1{raw}"
    url = httpx.URL(raw if has_scheme else f"http://{raw}")
    hostname = url.host or "127.0.0.1"
    if hostname in ("0.0.0.0", "::"):
        # A daemon bound to every interface is reached on loopback.
        hostname = "127.0.0.1"
    port = url.port if url.port is not None else (None if has_scheme else 11434)
    netloc = f"[{hostname}]" if ":" in hostname else hostname
    return f"{url.scheme}://{netloc}{f':{port}' if port else ''}{url.path.rstrip('/')}"


@dataclass(slots=True)
class DiscoveryResult:
    host: str
    models: list[str] = field(default_factory=list)
    error: str | None = None
    at: float = field(default_factory=time.monotonic)

    @property
    def note(self) -> str:
        if self.error is not None:
            return f"ollama: no daemon at {self.host} ({self.error}); set OLLAMA_HOST if it runs elsewhere"
        if not self.models:
            return f"ollama: daemon at {self.host} has no models (ollama pull <model>)"
        shown = ", ".join(self.models[:8]) + (", ..." if len(self.models) > 8 else "")
        return f"ollama: {len(self.models)} model(s) at {self.host}: {shown}"


async def probe(
    host: str | None = None,
    *,
    probe_timeout: float = PROBE_TIMEOUT,
    transport: httpx.AsyncBaseTransport | None = None,
) -> DiscoveryResult:
    """Ask the daemon for its models (``GET /api/tags``); never raises."""
    base = resolve_host(host)
    kwargs = {"transport": transport} if transport is not None else {}
    client = ollama.AsyncClient(host=base, timeout=probe_timeout, **kwargs)
    try:
        listing = await client.list()
    except (ollama.ResponseError, ConnectionError, httpx.HTTPError, ValueError) as exc:
        return DiscoveryResult(host=base, error=_describe(exc))
    finally:
        await client.close()
    names = sorted({model.model for model in listing.models if model.model})
    return DiscoveryResult(host=base, models=names)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionError | httpx.ConnectError):
        return "cannot resolve its host name" if _unresolved(exc) else "connection refused"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer within the probe timeout"
    if isinstance(exc, ollama.ResponseError):
        return f"HTTP {exc.status_code}: {exc.error}"
    return f"{type(exc).__name__}: {exc}"


def _unresolved(exc: BaseException | None) -> bool:
    """Whether a failed connection failed on the host name (``socket.gaierror`` somewhere
    down the chain: httpx and the ollama client wrap it as a connection error)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, socket.gaierror):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _names(model: str) -> tuple[str, list[str]]:
    base, _, tag = model.partition(":")
    if tag in ("", "latest"):
        aliases = [base, f"{base}:latest", f"ollama/{base}:latest"]
        return f"ollama/{base}", aliases
    return f"ollama/{model}", [model]


def groups_for(result: DiscoveryResult) -> list[ModelGroup]:
    """One model group per pulled model, each with one deployment on the probed daemon."""
    groups = []
    seen: set[str] = set()
    for model in result.models:
        name, aliases = _names(model)
        if name in seen:
            continue
        seen.add(name)
        deployment = Deployment(
            provider="ollama", model=model, id=f"ollama/{model}", options={"host": result.host}
        )
        groups.append(ModelGroup(name=name, deployments=[deployment], aliases=aliases))
    return groups
