"""Health probes for readiness, shared between callers.

``GET /ready`` needs no key, and each call probed every deployment: one request to the
service became one to each upstream (OpenRouter's ``/key``, Ollama's model list, a
remote server's ``/models``), and each would check the accounting database and Redis.
:class:`SharedProbes` runs at most one probe of each thing at a time, and lets callers
within :data:`PROBE_TTL_S` of its end reuse it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio

from llmrouter.deployments import DeploymentState

__all__ = ["PROBE_TTL_S", "SharedProbes", "probe_deployment"]

HEALTH_TIMEOUT_S = 2.0
PROBE_TTL_S = 1.0
"""How long a finished probe answers for its deployment (a load balancer probing every
few seconds still gets a fresh one each time)."""


async def probe_deployment(deployment: DeploymentState) -> dict[str, Any]:
    """The readiness fields of one probe: ``reachable``, ``detail``, ``latency_ms``."""
    if deployment.start_error is not None:
        return {"reachable": False}
    started = time.perf_counter()
    with anyio.move_on_after(HEALTH_TIMEOUT_S) as scope:
        try:
            health = await deployment.provider.health()
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return {"reachable": False, "detail": f"{type(exc).__name__}: {exc}"}
    if scope.cancelled_caught:
        return {"reachable": False, "detail": "health check timed out"}
    latency = health.latency_ms or round((time.perf_counter() - started) * 1000, 2)
    return {"reachable": health.ok, "detail": health.detail, "latency_ms": latency}


class _Probe:
    __slots__ = ("done", "ended_at", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.ended_at: float | None = None  # None while running, or when its caller left
        self.result: dict[str, Any] = {}


Check = Callable[[], Awaitable[dict[str, Any]]]


class SharedProbes:
    """One probe of each name at a time, reused for :data:`PROBE_TTL_S` after it ends."""

    def __init__(self) -> None:
        self._probes: dict[str, _Probe] = {}

    def forget(self, names: Iterable[str]) -> None:
        """Drop the probes of ``names`` (deployments gone from the router), so that the
        probes kept do not grow with every name ever probed. One still running answers
        its callers; the next caller under the name probes afresh."""
        for name in names:
            self._probes.pop(name, None)

    async def result(self, name: str, check: Check) -> dict[str, Any]:
        """What ``check()`` returns: this caller's own, or one running or just ended
        under ``name``."""
        while True:
            current = self._probes.get(name)
            if current is None or (
                current.ended_at is not None and time.monotonic() - current.ended_at > PROBE_TTL_S
            ):
                return await self._run(name, check)
            await current.done.wait()
            if current.ended_at is not None:
                return current.result
            # Its caller left before it ended: probe again.

    async def _run(self, name: str, check: Check) -> dict[str, Any]:
        mine = self._probes[name] = _Probe()
        try:
            mine.result = await check()
            mine.ended_at = time.monotonic()
        finally:
            if mine.ended_at is None and self._probes.get(name) is mine:
                del self._probes[name]
            mine.done.set()
        return mine.result
