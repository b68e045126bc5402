"""The cache's per-request work, made cheaper, does what it did: the same keys, the same
storable answers, the same breaker and memory backend behaviour, the same flights."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import msgspec
import pytest

from llmrouter.cache import MemoryBackend, ResponseCache, cache_key, canonical_request
from llmrouter.cache.breaker import Breaker
from llmrouter.cache.coalesce import Coalescer, Flight
from llmrouter.cache.entry import is_storable
from llmrouter.cache.key import KEY_VERSION, CanonicalRequest, _encoder
from llmrouter.cache.layer import _Plan
from llmrouter.context import RequestContext
from llmrouter.types import (
    ChatChoice,
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ChunkChoice,
    Delta,
    decode_chat_request,
)

from .test_cache_layer import BrokenBackend

pytestmark = pytest.mark.anyio

# --- the key ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "group", "namespace", "key"),
    [
        (
            {"model": "gpt", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0},
            "g",
            None,
            "chat:eaaa17938b06c6492bdeb24bed7a8992f4770f1c76871bf6cc49f0dfea99b951",
        ),
        (
            {
                "model": "gpt",
                "messages": [{"role": "user", "content": "Hi"}],
                "temperature": 1,
                "top_p": 0.5,
                "stop": "x",
                "max_tokens": 5,
                "n": 2,
                "seed": 3,
                "presence_penalty": 1,
                "frequency_penalty": -1.5,
                "logit_bias": {"12": 3},
                "logprobs": True,
                "top_logprobs": 2,
                "foo": [1, 2],
            },
            "g",
            "key-1",
            "ns:be2974546978e373:chat:9d0db79df116cde0515f63b56e80cac4fa2aae9c0a37be4822095de13de1873b",
        ),
    ],
)
def test_keys_are_those_of_key_version_3(
    body: dict[str, Any], group: str, namespace: str | None, key: str
) -> None:
    # Keys written before the key's hot path was made cheaper: entries stored then are found.
    assert KEY_VERSION == 3
    assert cache_key(decode_chat_request(body), group, namespace=namespace) == key


def test_a_library_request_keys_as_before() -> None:
    request = ChatRequest(
        model="gpt",
        messages=[ChatMessage(role="user", content="Hi")],
        temperature=0,
        top_p=1,
        stop=["a", "b"],
        max_tokens=64,
        max_completion_tokens=32,
    )
    assert cache_key(request, None) == "chat:d10de7c3e4faf10ede875cf63fa53bdbbd622aa03d2e309421f6235b1ee383c5"


class _Float(float):
    pass


def _reference(request: ChatRequest, group: str | None) -> CanonicalRequest:
    """The canonical request as KEY_VERSION 3 defined it, through the request's properties."""

    def number(value: Any) -> float | None:
        return None if value is None else float(value)

    return CanonicalRequest(
        KEY_VERSION,
        "chat",
        group or request.model,
        request.messages,
        request.tools,
        request.tool_choice,
        request.parallel_tool_calls,
        request.response_format,
        number(request.temperature),
        number(request.top_p),
        request.output_limit,
        request.n if request.n != 1 else None,
        request.stop_list or None,
        request.seed,
        number(request.presence_penalty),
        number(request.frequency_penalty),
        request.logit_bias,
        request.logprobs,
        request.top_logprobs,
        request.extra or None,
    )


def test_the_canonical_request_is_what_its_definition_gives() -> None:
    numbers: list[Any] = [None, 0, 0.0, 1, 0.7, True, _Float(0.5), -2]
    stops: list[Any] = [None, "", "x", [], ["a"], ["a", "b"], ("t",)]
    limits = [(None, None), (64, None), (None, 32), (64, 32)]
    seen = 0
    for temperature, top_p, penalty, stop, (max_tokens, max_completion), n in itertools.product(
        numbers, numbers[:4], numbers[:3], stops, limits, [None, 1, 2]
    ):
        request = ChatRequest(
            model="m",
            messages=[ChatMessage(role="user", content="hi")],
            temperature=temperature,
            top_p=top_p,
            presence_penalty=penalty,
            frequency_penalty=penalty,
            stop=stop,
            max_tokens=max_tokens,
            max_completion_tokens=max_completion,
            n=n,
            extra={"x": 1} if seen % 2 else {},
        )
        for group in (None, "g"):
            made = canonical_request(request, group)
            assert _encoder.encode(made) == _encoder.encode(_reference(request, group))
            seen += 1
    assert seen > 1000


# --- what is stored -------------------------------------------------------------------


def _response(*reasons: str | None) -> ChatResponse:
    return ChatResponse(
        choices=[
            ChatChoice(index=i, message=ChatMessage(role="assistant", content="x"), finish_reason=r)
            for i, r in enumerate(reasons)
        ]
    )


def _chunks(*reasons: str | None) -> list[ChatChunk]:
    out = [ChatChunk(choices=[ChunkChoice(index=i, delta=Delta(content="x")) for i in range(len(reasons))])]
    out.append(
        ChatChunk(
            choices=[ChunkChoice(index=i, delta=Delta(), finish_reason=r) for i, r in enumerate(reasons)]
        )
    )
    return out


@pytest.mark.parametrize(
    ("reasons", "stored", "stored_truncated"),
    [
        ((), False, False),
        (("stop",), True, True),
        (("tool_calls",), True, True),
        (("content_filter",), True, True),
        ((None,), False, False),
        (("length",), False, True),
        (("stop", "length"), False, True),
        (("stop", "stop"), True, True),
        (("stop", None), False, False),
        *(
            (("stop", reason), False, False)
            for reason in ("cancelled", "canceled", "abort", "aborted", "error")
        ),
    ],
)
def test_what_is_storable(reasons: tuple[str | None, ...], stored: bool, stored_truncated: bool) -> None:
    for answer in (_response(*reasons), _chunks(*reasons) if reasons else []):
        assert is_storable(answer) is stored
        assert is_storable(answer, store_truncated=False) is stored
        assert is_storable(answer, store_truncated=True) is stored_truncated


# --- the breaker and the memory backend -----------------------------------------------


def test_the_breaker_says_when_it_is_paused() -> None:
    now = [0.0]
    breaker = Breaker(pause=5.0, clock=lambda: now[0])
    assert not breaker.paused and breaker.allow()
    breaker.failed("lookup", RuntimeError("down"))
    assert breaker.paused and not breaker.allow()
    now[0] = 6.0
    assert breaker.allow() and breaker.paused and not breaker.allow()  # one tries again
    breaker.released()
    assert breaker.allow()
    breaker.succeeded()
    assert not breaker.paused and breaker.allow()


async def test_a_paused_backend_is_left_alone_then_tried_again() -> None:
    now = [0.0]
    backend = BrokenBackend()
    cache = ResponseCache(backend, coalesce=False)
    cache.breaker = Breaker(pause=5.0, clock=lambda: now[0])
    response = _response("stop")

    async def call() -> ChatResponse:
        return response

    def request(text: str) -> ChatRequest:
        return ChatRequest(model="g", messages=[ChatMessage(role="user", content=text)], temperature=0)

    assert await cache.chat(RequestContext(model_group="g"), request("a"), call) is response
    assert (backend.calls, cache.breaker.paused) == (1, True)
    assert cache.stats.errors == 1 and cache.stats.skipped == 1
    await cache.chat(RequestContext(model_group="g"), request("b"), call)
    assert backend.calls == 1  # skipped while paused
    now[0], backend.down = 6.0, False
    await cache.chat(RequestContext(model_group="g"), request("c"), call)
    assert (backend.calls, cache.breaker.paused) == (3, False)  # a lookup and a store
    ctx = RequestContext(model_group="g")
    await cache.chat(ctx, request("c"), call)
    assert ctx.cache_status == "hit" and cache.stats.stores == 1


async def test_the_memory_backend_stays_within_its_bound() -> None:
    backend = MemoryBackend(max_bytes=1000)
    assert await backend.set("a", b"x" * 100, None)
    assert await backend.set("b", b"x" * 100, 60.0)
    assert backend.stats().entries == 2 and backend.stats().bytes == 2 * (1 + 100 + 250)
    assert await backend.set("c", b"x" * 300, None)  # evicts "a", the least recently used
    assert await backend.get("a") is None and await backend.get("b") == b"x" * 100
    assert backend.stats().evictions == 1 and backend.stats().bytes <= 1000
    assert await backend.set("b", b"y", None)  # replaces: counted once
    assert backend.stats().bytes == (1 + 1 + 250) + (1 + 300 + 250)
    assert await backend.set("big", b"x" * 1000, None) is False  # over the whole bound
    assert await backend.get("big") is None and backend.stats().entries == 2


# --- flights and plans ------------------------------------------------------------------


def test_a_flight_is_made_either_way() -> None:
    ctx = RequestContext()
    for flight in (Flight("k", ctx, True), Flight("k", ctx, streaming=True)):
        assert flight.streaming and flight.origin is ctx and flight.payer is ctx
        assert not flight.done and flight.calling and flight.attendees == [] and flight.chunks == []
    coalescer = Coalescer()
    flight = coalescer.open("k", ctx)
    assert not flight.streaming and coalescer.find("k") is flight and len(coalescer) == 1
    flight.finish(response=_response("stop"))
    coalescer.close(flight)
    assert flight.ended and coalescer.find("k") is None and len(coalescer) == 0


def test_a_plan_is_a_plan() -> None:
    cache = ResponseCache(MemoryBackend())
    request = ChatRequest(model="g", messages=[ChatMessage(role="user", content="hi")], temperature=0)
    plan = cache._plan(RequestContext(model_group="g", fallback_groups=("h",)), request)
    assert isinstance(plan, _Plan)
    assert plan == _Plan(cache_key(request, "g"), 3600.0, "g", f"{cache_key(request, 'g')} via ('h',)")
    assert plan.group == "g" and plan.ttl == 3600.0


def test_entries_round_trip() -> None:
    # A stored answer still reads back as it was written (the encoding did not change).
    from llmrouter.cache.entry import decode_entry, encode_entry

    response = _response("stop")
    entry = decode_entry(encode_entry(response=response, group="h"))
    assert entry.response == response and entry.group == "h" and entry.chunks is None
    assert msgspec.msgpack.decode(encode_entry(response=response)).keys() == {"response", "stored_at"}


def test_the_benchmark_stand_in_for_the_entry_encoding_stores_a_valid_entry() -> None:
    # benchmarks/gateway_instructions.py --without entry-encoding: a stand-in that the
    # layer cannot call (it lacked ``group``) made every store log a traceback instead.
    import importlib.util
    import inspect
    from pathlib import Path

    from llmrouter.cache.entry import decode_entry, encode_entry

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gateway_instructions.py"
    spec = importlib.util.spec_from_file_location("gateway_instructions", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _what, _target, stand_in = module.PARTS["entry-encoding"]
    assert inspect.signature(stand_in).parameters.keys() == inspect.signature(encode_entry).parameters.keys()
    entry = decode_entry(stand_in(response=_response("stop"), chunks=None, group=None))
    assert entry.response is not None and is_storable(entry.response)


# --- found by review of the hot path's rewrite ----------------------------------------------

_HI = ChatRequest(model="g", messages=[ChatMessage(role="user", content="hi")], temperature=0)
_ANSWER = ChatResponse(
    choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content="x"), finish_reason="stop")]
)


async def test_an_answer_arriving_after_the_cache_closed_is_not_stored() -> None:
    """Closed while the origin's own call ran (shutdown): the flight ended without the
    answer, which is not stored (a SQLite backend would reopen its database to store it)."""
    backend = MemoryBackend()
    cache = ResponseCache(backend)
    gate = asyncio.Event()

    async def call() -> ChatResponse:
        await gate.wait()
        return _ANSWER

    task = asyncio.create_task(cache.chat(RequestContext(model_group="g"), _HI, call))
    await asyncio.sleep(0.01)
    await cache.aclose()
    gate.set()
    assert await task is _ANSWER
    assert (cache.stats.stores, cache.stats.skipped, backend.stats().entries) == (0, 1, 0)


async def test_a_breaker_of_the_users_is_asked_before_every_backend_call() -> None:
    class Off(Breaker):  # a library user's policy: never use the backend
        def allow(self) -> bool:
            return False

    class Minimal:  # the four calls the layer makes, and nothing else
        def allow(self) -> bool:
            return True

        def succeeded(self) -> None:
            pass

        def failed(self, doing: str, exc: Exception) -> None:
            pass

        def released(self) -> None:
            pass

    backend = MemoryBackend()
    cache = ResponseCache(backend, coalesce=False)
    cache.breaker = Off()
    assert await cache.chat(RequestContext(model_group="g"), _HI, _answer_now) is _ANSWER
    assert (backend.stats().entries, cache.stats.skipped) == (0, 1)
    cache.breaker = Minimal()  # type: ignore[assignment]
    assert await cache.chat(RequestContext(model_group="g"), _HI, _answer_now) is _ANSWER
    assert backend.stats().entries == 1


async def _answer_now() -> ChatResponse:
    return _ANSWER
