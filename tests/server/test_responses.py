"""JSONResponse fills Litestar's response exactly as ASGIResponse would for the same answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from litestar.response.base import ASGIResponse

from llmrouter.server.responses import JSONResponse


@pytest.mark.parametrize("status", [200, 404, 503])
def test_every_slot_is_what_asgiresponse_sets(status: int) -> None:
    body = '{"answer":"é"}'.encode()
    headers = {"x-llmrouter-model-group": "m", "x-llmrouter-cost": "0.000100"}
    ours = JSONResponse(body, headers, status)
    theirs = ASGIResponse(body=body, media_type="application/json", status_code=status)
    theirs.headers.headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())
    slots = [slot for cls in type(theirs).__mro__ for slot in getattr(cls, "__slots__", ())]
    assert "headers" in slots and "status_code" in slots
    for slot in slots:
        mine, litestars = getattr(ours, slot), getattr(theirs, slot)
        if slot == "headers":
            mine, litestars = mine.headers, litestars.headers
        assert mine == litestars, slot
    assert ours.encode_headers() == theirs.encode_headers()


def test_an_sse_response_is_what_asgistreamingresponse_sets() -> None:
    from litestar.response.streaming import ASGIStreamingResponse

    from llmrouter.server.sse import SSEResponse

    async def chunks() -> AsyncIterator[bytes]:
        yield b""

    source = chunks()
    headers = {"x-llmrouter-model-group": "m", "x-request-id": "abc"}
    ours = SSEResponse(None, source, "abc", headers)
    theirs = ASGIStreamingResponse(
        iterator=source,
        headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers},
        media_type="text/event-stream",
        status_code=200,
    )
    slots = [slot for cls in ASGIStreamingResponse.__mro__ for slot in getattr(cls, "__slots__", ())]
    assert "iterator" in slots and "headers" in slots
    for slot in slots:
        mine, litestars = getattr(ours, slot), getattr(theirs, slot)
        if slot == "headers":
            mine, litestars = mine.headers, litestars.headers
        assert mine == litestars, slot
