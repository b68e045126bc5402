"""Health probes of deployments for readiness, shared between callers.

``GET /ready`` needs no key, and each call probed every deployment: one request to the
service became one to each upstream (OpenRouter's ``/key``, Ollama's model list, a
remote server's ``/models``). :class:`SharedProbes` runs at most one probe per
deployment at a time, and lets callers within :data:`PROBE_TTL_S` of its end reuse it.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from llmrouter.deployments import DeploymentState

__all__ = ["PROBE_TTL_S", "SharedProbes", "probe"]

HEALTH_TIMEOUT_S = 2.0
PROBE_TTL_S = 1.0
"""How long a finished probe answers for its deployment (a load balancer probing every
few seconds still gets a fresh one each time)."""


async def probe(deployment: DeploymentState) -> dict[str, Any]:
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


class SharedProbes:
    """One probe per deployment at a time, reused for :data:`PROBE_TTL_S` after it ends."""

    def __init__(self) -> None:
        self._probes: dict[str, _Probe] = {}

    async def result(self, deployment: DeploymentState) -> dict[str, Any]:
        while True:
            current = self._probes.get(deployment.id)
            if current is None or (
                current.ended_at is not None and time.monotonic() - current.ended_at > PROBE_TTL_S
            ):
                return await self._run(deployment)
            await current.done.wait()
            if current.ended_at is not None:
                return current.result
            # Its caller left before it ended: probe again.

    async def _run(self, deployment: DeploymentState) -> dict[str, Any]:
        mine = self._probes[deployment.id] = _Probe()
        try:
            mine.result = await probe(deployment)
            mine.ended_at = time.monotonic()
        finally:
            if mine.ended_at is None and self._probes.get(deployment.id) is mine:
                del self._probes[deployment.id]
            mine.done.set()
        return mine.result
