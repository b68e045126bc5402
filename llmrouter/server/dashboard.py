"""The usage dashboard: a static page over ``GET /v1/usage`` and ``GET /v1/admin/usage``.

``GET /dashboard`` serves ``static/dashboard.html``; its script and stylesheet come from
``GET /dashboard/{asset}`` (referenced relative to the page, so a reverse proxy may add a
path prefix). The page holds no data of its own: it asks for an API key
(kept in the tab's ``sessionStorage``) and calls the accounting endpoints from the
browser, so the usual key checks apply. Every response carries a strict same-origin
Content-Security-Policy (no inline script or style, no third-party origin, no framing).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from litestar import Request, Response, get
from litestar.params import FromPath

from llmrouter.errors import NotFoundError

__all__ = ["CONTENT_SECURITY_POLICY", "dashboard_handlers"]

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

# The only files served: a fixed map, so no request path ever reaches the filesystem.
# Media types without a charset: Litestar adds "; charset=utf-8" to every text/* type
# (given one, it sent "text/html; charset=utf-8; charset=utf-8").
_ASSETS = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}

_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page is tiny; always revalidating keeps it in step with the server version.
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return resources.files("llmrouter.server").joinpath("static", name).read_bytes()


def _respond(name: str, media_type: str) -> Response[bytes]:
    return Response(content=_read(name), media_type=media_type, encoding="utf-8", headers=_HEADERS)


@get("/dashboard", include_in_schema=False)
async def dashboard_page(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The dashboard HTML page (``/dashboard/`` redirects to ``/dashboard``)."""
    if request.scope.get("raw_path", b"").endswith(b"/"):
        # The page loads its assets relative to its own URL, so that it also works under
        # a reverse proxy's path prefix; that needs the URL without the trailing slash.
        # A relative Location keeps the prefix the browser sees.
        return Response(content=b"", status_code=308, headers={**_HEADERS, "Location": "../dashboard"})
    return _respond("dashboard.html", "text/html")


@get("/dashboard/{asset:str}", include_in_schema=False)
async def dashboard_asset(asset: FromPath[str]) -> Response[bytes]:
    """The page's script and stylesheet; anything else is a 404."""
    media_type = _ASSETS.get(asset)
    if media_type is None:
        raise NotFoundError(f"no dashboard asset {asset!r}")
    return _respond(asset, media_type)


dashboard_handlers = [dashboard_page, dashboard_asset]
"""Route handlers that :func:`~llmrouter.server.create_app` mounts."""
