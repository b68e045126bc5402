"""JSONResponse and SSEResponse fill Litestar's response slots exactly as ASGIResponse and
ASGIStreamingResponse would for the same answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse

from llmrouter.server.responses import JSONResponse
from llmrouter.server.sse import SSEResponse

HEADERS = {"x-llmrouter-model-group": "m", "x-llmrouter-cost": "0.000100", "x-request-id": "abc"}


def assert_same_slots(ours: ASGIResponse, theirs: ASGIResponse) -> None:
    slots = [slot for cls in type(theirs).__mro__ for slot in getattr(cls, "__slots__", ())]
    assert "headers" in slots and "status_code" in slots
    for slot in slots:
        mine, litestars = getattr(ours, slot), getattr(theirs, slot)
        if slot == "headers":
            mine, litestars = mine.headers, litestars.headers
        assert mine == litestars, slot
    assert ours.encode_headers() == theirs.encode_headers()


@pytest.mark.parametrize("status", [200, 404, 503])
def test_a_json_response_is_what_asgiresponse_makes_of_it(status: int) -> None:
    body = '{"answer":"é"}'.encode()
    theirs = ASGIResponse(body=body, media_type="application/json", status_code=status)
    theirs.headers.headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in HEADERS.items())
    assert_same_slots(JSONResponse(body, HEADERS, status), theirs)


def test_an_sse_response_is_what_asgistreamingresponse_makes_of_it() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b""

    source = chunks()
    theirs = ASGIStreamingResponse(
        iterator=source,
        headers={"cache-control": "no-cache", "x-accel-buffering": "no", **HEADERS},
        media_type="text/event-stream",
        status_code=200,
    )
    assert_same_slots(SSEResponse(None, source, "abc", HEADERS), theirs)
    assert "iterator" in ASGIStreamingResponse.__slots__  # compared above


@pytest.mark.anyio
async def test_a_stream_whose_response_cannot_be_made_is_closed_at_once() -> None:
    # Its upstream stream and its deployment's slot go now, not when the collector
    # finalises the generator.
    import anyio

    from llmrouter.server.sse import open_stream

    closed: list[bool] = []

    async def chunks() -> AsyncIterator[str]:
        try:
            yield "first"
            yield "second"
        finally:
            closed.append(True)

    async def receive() -> dict[str, str]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    def headers() -> dict[str, str]:
        raise RuntimeError("a header that cannot be sent")

    with pytest.raises(RuntimeError):
        await open_stream(receive, chunks(), headers, "request-1")
    assert closed == [True]
