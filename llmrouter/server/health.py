"""``GET /health`` (liveness) and ``GET /ready`` (deployments and extensions)."""

from __future__ import annotations

from typing import Any

from litestar import Request, get
from litestar.openapi.datastructures import ResponseSpec
from litestar.response.base import ASGIResponse

from llmrouter.server.responses import json_response
from llmrouter.server.state import service_of

__all__ = ["liveness", "readiness"]

_ALIVE = b'{"status":"ok"}'


@get("/health", summary="Liveness: the process answers", tags=["health"], operation_id="health")
async def liveness() -> ASGIResponse:
    return ASGIResponse(body=_ALIVE, media_type="application/json")


@get(
    "/ready",
    summary="Readiness: deployments' health and extensions' state (503 when not ready)",
    tags=["health"],
    operation_id="ready",
    responses={503: ResponseSpec(data_container=dict[str, Any], description="Not ready: the same report")},
)
async def readiness(request: Request[Any, Any, Any]) -> ASGIResponse:
    service = service_of(request)
    report: dict[str, Any] = dict(await service.active_router.readiness())
    extensions: dict[str, Any] = {}
    for ext in service.extensions:
        try:
            extensions[ext.name] = dict(await ext.check())
        except Exception as exc:  # noqa: BLE001 - one broken extension must not hide the others
            extensions[ext.name] = {"ready": False, "error": f"{type(exc).__name__}: {exc}"}
    report["extensions"] = extensions
    ready = bool(report.get("ready", True)) and all(
        entry.get("ready", True) is not False for entry in extensions.values()
    )
    report["ready"] = ready
    if service.discovery_notes:
        report["discovery"] = service.discovery_notes
    return json_response(report, {}, 200 if ready else 503)
