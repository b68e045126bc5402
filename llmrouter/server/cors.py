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
- a request that reached the service over loopback sent to a ``Host`` other than those
  no DNS answer can make (``localhost`` and ``*.localhost``, an IP literal) and the hosts
  of origins ``server.cors_origins`` allows: code ``host_not_allowed``. This is the
  DNS-rebinding page, whose requests are same-origin (to ``Host: attacker.example``),
  and carry no ``Origin`` on a GET. Every request is checked, not only those that look
  like a browser's: a page in Firefox may set its own ``User-Agent``, and a browser sends
  ``Sec-Fetch-Site`` to trustworthy origins only. Which connections are loopback ones is
  the ASGI server's to say (the scope's ``server``), not the config's: ``llmrouter serve
  --host`` and ``uvicorn --host`` bind elsewhere than ``server.host``, and a loopback
  connection to a ``0.0.0.0`` bind is rebound as easily. The machine's host name (which
  /etc/hosts maps to loopback) and ``server.host`` pass too: no rebinding page sends
  them. A reverse proxy on the same machine that keeps the public ``Host`` needs that
  origin listed.

SDKs and curl on this machine name ``localhost`` or an address and pass; the check is a
loop over the header names and two dictionary lookups. Refusals are logged, at most a
line every :data:`LOG_EVERY_SECONDS` (they are answered before the request id and the
telemetry layers).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import time
from collections.abc import Sequence
from typing import Any

import msgspec
from litestar.config.cors import CORSConfig

from llmrouter.asgi import shown_path
from llmrouter.server.errors import error_body

__all__ = ["refuse_foreign_origins"]

log = logging.getLogger("llmrouter.server")

_REMEMBERED = 256
"""How many ``Host`` values, and server addresses, the check remembers its answer for
(nearly every request brings one it has seen: a parse and an address lookup saved)."""

LOG_EVERY_SECONDS = 10.0
"""At most one line a refusal per this long, with a count of the others (any page can
send refused requests by the hundred)."""


def refuse_foreign_origins(app: Any, cors_origins: Sequence[str], *, own_names: Sequence[str] = ()) -> Any:
    """``app`` (an ASGI callable), refusing what the module's notes say, where
    ``cors_origins`` is ``server.cors_origins``, and ``own_names`` names of this machine
    (``server.host``) taken besides its host name."""
    policy = _OriginPolicy(cors_origins, own_names)

    async def handle(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refusal = policy.refusal(scope)
            if refusal is not None:
                policy.log(scope, refusal)
                await _send_403(send, refusal)
                return
        await app(scope, receive, send)

    return handle


class _OriginPolicy:
    def __init__(self, cors_origins: Sequence[str], own_names: Sequence[str] = ()) -> None:
        self._cors = CORSConfig(allow_origins=list(cors_origins)) if cors_origins else None
        # The machine's own names: programs here use them (/etc/hosts maps the host name
        # to loopback), and a rebinding page cannot send them (its Host is its own name).
        self._own_names = {name.lower() for name in (socket.gethostname(), *own_names) if name}
        self._hosts: dict[bytes, bool] = {}
        self._loopback: dict[str, bool] = {}
        self._logged_at = -math.inf
        self._unlogged = 0

    def refusal(self, scope: Any) -> dict[str, Any] | None:
        """The error body refusing the request, None to let it through."""
        host = origin = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
        if origin is not None and self._allows(_text(origin)):
            return None
        if host is not None and self._over_loopback(scope) and not self._host_allowed(host):
            return error_body(
                f"host {_text(host)[:100]!r} is not a loopback name, on a loopback connection (a"
                " page after DNS rebinding?); add its origin to server.cors_origins to allow it",
                "permission_error",
                "host_not_allowed",
            )
        if origin is not None and _text(origin).partition("://")[2].lower() != _text(host or b"").lower():
            return error_body(
                f"origin {_text(origin)[:100]!r} is not allowed (server.cors_origins)",
                "permission_error",
                "cors_origin_not_allowed",
            )
        return None

    def log(self, scope: Any, refusal: dict[str, Any]) -> None:
        """Log a refusal (answered before the request id and telemetry layers, it would
        leave no trace), at most one line every :data:`LOG_EVERY_SECONDS`."""
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY_SECONDS:
            self._unlogged += 1
            return
        others = f" ({self._unlogged} more refused since the last line)" if self._unlogged else ""
        self._logged_at, self._unlogged = now, 0
        log.warning(
            "refused %s %r: %s%s",
            scope["method"],
            shown_path(scope["path"])[:200],
            refusal["error"]["message"],
            others,
        )

    def _allows(self, origin: str) -> bool:
        return self._cors is not None and self._cors.is_origin_allowed(origin)

    def _host_allowed(self, host: bytes) -> bool:
        """Whether requests over loopback may name ``host``: one no DNS answer can make,
        or the host of an origin the operator allows (a reverse proxy on the same machine
        that keeps the public ``Host``)."""
        allowed = self._hosts.get(host)
        if allowed is None:
            text = _text(host)
            allowed = (
                _is_loopback_name(text)
                or _name_of(text) in self._own_names
                or self._allows(f"https://{text}")
                or self._allows(f"http://{text}")
            )
            if len(self._hosts) < _REMEMBERED:
                self._hosts[host] = allowed
        return allowed

    def _over_loopback(self, scope: Any) -> bool:
        """Whether the connection was made to a loopback address (not for a Unix socket,
        nor a test client's made-up ``testserver``)."""
        server = scope.get("server")
        if server is None:
            return False
        address = str(server[0])
        loopback = self._loopback.get(address)
        if loopback is None:
            loopback = _is_loopback_address(address)
            if len(self._loopback) < _REMEMBERED:
                self._loopback[address] = loopback
        return loopback


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _is_loopback_name(host: str) -> bool:
    """Whether a ``Host`` header (``name[:port]``, ``[v6][:port]``) is one no DNS answer
    can make: ``localhost`` and its subdomains (which browsers resolve to loopback
    themselves), or an IP literal (``0.0.0.0``, the address ``serve --host 0.0.0.0``
    prints, included)."""
    name = _name_of(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _name_of(host: str) -> str:
    """The name of a ``Host`` header (``name[:port]``, ``[v6][:port]``), lowercased."""
    if host.startswith("["):
        return host[1 : host.find("]")].lower()
    return (host.rpartition(":")[0] if ":" in host else host).lower()


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
