"""What the OpenAPI document (``/schema``) says of request bodies the handlers read raw.

The completion handlers, and the admin API's, read the body themselves (decoded by msgspec
into the request Structs, with the service's own OpenAI-style errors), so Litestar finds no
``data`` parameter to document: the document had no request body at all, and Swagger's "Try
it out" sent an empty one. :func:`documented_body` gives a route a dependency that declares
the body's type: Litestar documents it as the body, and never runs it (no handler asks for
it).
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any

import msgspec
from litestar.di import Provide
from litestar.openapi.spec.example import Example
from litestar.params import Body

__all__ = ["documented_body"]


def documented_body(struct: type[msgspec.Struct], example: dict[str, Any]) -> dict[str, Provide]:
    """Route dependencies that document ``struct`` (with ``example``) as the JSON body."""

    def body(data: Any) -> None:
        raise AssertionError("documents the request body; never resolved")

    # Set here, not written in the signature: this module's annotations are strings, read
    # where these names are not defined.
    documented = Annotated[_as_sent(struct), Body(examples=[Example(summary="example", value=example)])]  # type: ignore[valid-type]
    body.__annotations__ = {"data": documented, "return": None}
    return {"documented_body": Provide(body, sync_to_thread=False)}


@cache
def _as_sent(struct: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """``struct`` as a client sends it: without ``extra``, where the request Structs keep
    the fields they do not model (on the wire those are top-level fields of their own, not
    an ``__extra__`` object). The same name, so the document calls it as before."""
    fields = [
        (field.name, field.type, field.default)
        if field.default is not msgspec.NODEFAULT
        else (field.name, field.type)
        for field in msgspec.structs.fields(struct)
        if field.encode_name != "__extra__"
    ]
    return msgspec.defstruct(struct.__name__, fields, kw_only=True, module=struct.__module__)
