"""Identifiers made per request: without a system call each.

``os.urandom`` and ``uuid.uuid4`` ask the kernel for every id; on a virtual machine that
costs several microseconds, and a request makes several ids. These come from the
``random`` module's generator (seeded from the OS at start-up, re-seeded in a forked
child): unique with overwhelming odds, not secrets. API keys and anything that must be
unguessable use :mod:`secrets` instead.
"""

from __future__ import annotations

import time
from random import getrandbits
from typing import Any

from llmrouter.asgi import scope_header

__all__ = ["REQUEST_ID_KEY", "new_id", "random_hex", "request_id_of"]

REQUEST_ID_KEY = "llmrouter.request_id"
"""Where :func:`request_id_of` keeps the id in the ASGI scope."""
_MAX_REQUEST_ID_LENGTH = 128


def random_hex(digits: int) -> str:
    """``digits`` (an even number) random lowercase hex digits, never all zeros (W3C
    trace and span ids). Through bytes: ``bytes.hex`` costs half of a ``:032x`` format."""
    return (getrandbits(digits * 4) or 1).to_bytes(digits // 2, "big").hex()


def new_id() -> str:
    """A unique id in 32 hex digits that sorts by creation time: nanoseconds since the
    epoch, then 64 random bits. Index inserts of such ids land at the end of the
    B-tree (a ledger of random ids got twice as slow to insert into by 100k rows)."""
    return (time.time_ns() << 64 | getrandbits(64)).to_bytes(16, "big").hex()


def request_id_of(scope: Any) -> str:
    """The request id of an ASGI request (``scope``: its scope mapping, any ASGI
    framework's type): the one already assigned, else the client's
    ``X-Request-ID``, else a new one; kept in the scope, so that the access log, the
    response header and the ledger all name the same id."""
    existing = scope.get(REQUEST_ID_KEY)
    if existing:
        return str(existing)
    sent = scope_header(scope, b"x-request-id")
    # Only a sane id is echoed back and forwarded upstream: visible ASCII. Latin-1 letters
    # are "printable" but no HTTP client sends them on (httpx refuses them: the upstream
    # call failed), and spaces split log fields.
    if sent and len(sent) <= _MAX_REQUEST_ID_LENGTH and all(0x21 <= byte <= 0x7E for byte in sent):
        request_id = sent.decode("ascii")
    else:
        request_id = new_id()
    scope[REQUEST_ID_KEY] = request_id
    return request_id
