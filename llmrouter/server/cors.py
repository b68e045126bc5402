"""Which web pages may use the service: the ``Origin`` and ``Host`` checks.

Before the first key exists (accounting's ``auth: auto``) the API needs none, so any page
the operator visits could use it: a cross-site ``text/plain`` POST needs no CORS
preflight (and the service reads its body as JSON), and after DNS rebinding (the page's
own name made to resolve to 127.0.0.1) the page even reads the answers, an admin key's
secret included. :func:`refuse_foreign_origins` goes in front of the app and answers 403
with an OpenAI error body to

- a request whose ``Origin`` is neither allowed by ``server.cors_origins`` (matched as
  Litestar's CORS matches them, ``*`` included) nor its own (the ``Host`` it was sent
  to): code ``cors_origin_not_allowed``, a CORS preflight included;
- a request from a browser (one with an ``Origin`` or a ``Sec-Fetch-Site`` header, or a
  browser's ``User-Agent``) that reached the service over loopback, sent to a ``Host``
  that no DNS answer can make (``localhost`` and ``*.localhost``, an IP literal) nor the
  host of an origin ``server.cors_origins`` allows: code ``host_not_allowed``. This is the DNS-rebinding
  page, whose requests are same-origin (to ``Host: attacker.example``). Which
  connections are loopback ones is the ASGI server's to say (the scope's ``server``), not
  the config's: ``llmrouter serve --host`` and ``uvicorn --host`` bind elsewhere than
  ``server.host``, and a loopback connection to a ``0.0.0.0`` bind is rebound as easily.

SDKs and curl send none of these headers: for them the check is a loop over the header
names. A refusal is logged (it is answered before the request id and telemetry layers).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

import msgspec
from litestar.config.cors import CORSConfig

from llmrouter.asgi import scope_header
from llmrouter.server.errors import error_body

__all__ = ["refuse_foreign_origins"]

log = logging.getLogger("llmrouter.server")

_FROM_A_BROWSER = frozenset({b"origin", b"sec-fetch-site"})
"""Headers only browsers send (``Origin`` on every cross-origin or non-GET request;
``Sec-Fetch-Site`` only to trustworthy origins, HTTPS or localhost: not to a rebinding
page's plain ``http://attacker``, whose same-origin GETs carry neither, which is why a
browser's ``User-Agent`` counts too)."""

_BROWSER_AGENT = b"Mozilla/"
"""How every browser's ``User-Agent`` begins (and no SDK's, nor curl's)."""


def refuse_foreign_origins(app: Any, cors_origins: Sequence[str]) -> Any:
    """``app`` (an ASGI callable), refusing what the module's notes say, where
    ``cors_origins`` is ``server.cors_origins``."""
    policy = _OriginPolicy(cors_origins)

    async def handle(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name in _FROM_A_BROWSER or (name == b"user-agent" and value.startswith(_BROWSER_AGENT)):
                    refusal = policy.refusal(scope)
                    if refusal is not None:
                        # Outside the request-id and telemetry layers: logged here, or an
                        # operator behind a misconfigured proxy would see nothing.
                        log.warning(
                            "refused %s %s: %s",
                            scope["method"],
                            scope["path"][:200],
                            refusal["error"]["message"],
                        )
                        await _send_403(send, refusal)
                        return
                    break
        await app(scope, receive, send)

    return handle


class _OriginPolicy:
    def __init__(self, cors_origins: Sequence[str]) -> None:
        self._cors = CORSConfig(allow_origins=list(cors_origins)) if cors_origins else None

    def refusal(self, scope: Any) -> dict[str, Any] | None:
        """The error body refusing a request from a browser, None to let it through."""
        origin = _text(scope_header(scope, b"origin"))
        if origin is not None and self._allows(origin):
            return None
        host = _text(scope_header(scope, b"host")) or ""
        if _over_loopback(scope) and not _is_loopback_name(host) and not self._allows_host(host):
            return error_body(
                f"host {host!r} is not a loopback name, on a loopback connection (a page after DNS"
                " rebinding?); add its origin to server.cors_origins to allow it",
                "permission_error",
                "host_not_allowed",
            )
        if origin is not None and origin.partition("://")[2].lower() != host.lower():
            return error_body(
                f"origin {origin!r} is not allowed (server.cors_origins)",
                "permission_error",
                "cors_origin_not_allowed",
            )
        return None

    def _allows(self, origin: str) -> bool:
        return self._cors is not None and self._cors.is_origin_allowed(origin)

    def _allows_host(self, host: str) -> bool:
        """A service behind a reverse proxy that keeps the ``Host`` is reached under the
        name of an origin the operator allows."""
        return self._allows(f"https://{host}") or self._allows(f"http://{host}")


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _over_loopback(scope: Any) -> bool:
    """Whether the connection was made to a loopback address (None for a Unix socket;
    a test client's made-up ``testserver`` is none)."""
    server = scope.get("server")
    return server is not None and _is_loopback_address(str(server[0]))


def _is_loopback_name(host: str) -> bool:
    """Whether a ``Host`` header (``name[:port]``, ``[v6][:port]``) is one no DNS answer
    can make: ``localhost`` and its subdomains (which browsers resolve to loopback
    themselves), or an IP literal (``0.0.0.0``, the address ``serve --host 0.0.0.0``
    prints, included)."""
    if host.startswith("["):
        name = host[1 : host.find("]")]
    else:
        name = host.rpartition(":")[0] if ":" in host else host
    name = name.lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback_address(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return bool((mapped or address).is_loopback)


async def _send_403(send: Any, body: dict[str, Any]) -> None:
    content = msgspec.json.encode(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": content, "more_body": False})
