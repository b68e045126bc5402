"""What the router takes from its caller: request structs (validated as dicts are), a
RequestContext (one per request) and event hooks (which never change the outcome)."""

import logging

import anyio
import anyio.lowlevel
import pytest

from llmrouter import RequestContext, Router, RouterHooks
from llmrouter.config import Deployment, Price
from llmrouter.errors import InvalidRequestError
from llmrouter.testing.scripted import ScriptedProvider, Step
from llmrouter.types import ChatMessage, ChatRequest, CompletionRequest

pytestmark = pytest.mark.anyio

HI = [ChatMessage(role="user", content="hi")]


def chat_body():
    return {"model": "g", "messages": [{"role": "user", "content": "hi"}]}


def make_router(provider, hooks=(), price=None):
    router = Router(hooks=hooks)
    router.add_deployment("g", provider, Deployment(provider="scripted", model=provider.model, price=price))
    return router


# --- request structs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (ChatRequest(model="g", messages=HI, max_tokens=-1_000_000), "max_tokens"),
        (ChatRequest(model="g", messages=HI, max_completion_tokens=0), "max_completion_tokens"),
        (ChatRequest(model="g", messages=HI, n=129), "n"),
        (ChatRequest(model="g", messages=[]), "messages"),
        (ChatRequest(model="", messages=HI), "model"),
    ],
)
async def test_a_chat_struct_is_held_to_the_rules_of_a_dict(request_, param):
    provider = ScriptedProvider()
    router = make_router(provider, price=Price(input=1.0, output=2.0))
    for call in (router.chat, _streamed(router.stream)):
        ctx = RequestContext()
        with pytest.raises(InvalidRequestError) as info:
            await call(request_, context=ctx)
        assert info.value.http_status == 400 and info.value.param == param
        assert ctx.max_cost is None  # refused before any budget was reserved
    assert provider.record.calls == 0


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (CompletionRequest(model="g", prompt="hi", max_tokens=-5), "max_tokens"),
        (CompletionRequest(model="g", prompt="hi", best_of=0), "best_of"),
        (CompletionRequest(model="g", prompt="hi", n=0), "n"),
    ],
)
async def test_a_completion_struct_is_held_to_the_rules_of_a_dict(request_, param):
    provider = ScriptedProvider()
    router = make_router(provider)
    for call in (router.complete, _streamed(router.stream_complete)):
        with pytest.raises(InvalidRequestError) as info:
            await call(request_)
        assert info.value.param == param
    assert provider.record.calls == 0


async def test_a_sound_struct_is_not_decoded_again(monkeypatch):
    # The service passes the structs it decoded: checking them must not cost a decoding.
    import llmrouter.router as router_module

    def no_decoding(_):
        raise AssertionError("decoded again")

    monkeypatch.setattr(router_module, "decode_chat_request", no_decoding)
    monkeypatch.setattr(router_module, "decode_completion_request", no_decoding)
    provider = ScriptedProvider(default=Step(text="fine"))
    router = make_router(provider)
    request = ChatRequest(model="g", messages=HI, max_tokens=5, n=2)
    assert (await router.chat(request)).choices[0].message.content == "fine"
    assert provider.record.requests[-1].messages is request.messages
    await router.complete(CompletionRequest(model="g", prompt="hi", best_of=2))


def _streamed(stream):
    async def call(request, context=None):
        async for _ in stream(request, context=context):
            pass

    return call


# --- RequestContext reuse ----------------------------------------------------------------


async def test_a_context_is_refused_for_a_second_request():
    statuses = []

    class Record(RouterHooks):
        async def after_request(self, ctx):
            statuses.append(ctx.status)

    provider = ScriptedProvider(steps=[Step(text="one"), Step(text="two three four")])
    router = make_router(provider, hooks=[Record()])
    ctx = RequestContext(api_key_id="k1")
    await router.chat(chat_body(), context=ctx)
    for call in (router.chat, _streamed(router.stream)):
        with pytest.raises(ValueError, match="already used"):
            await call(chat_body(), context=ctx)
    # The first request's record is left as it was; the refused calls reached nothing.
    assert ctx.usage.completion_tokens == 1 and ctx.status == "ok"
    assert statuses == ["ok"] and provider.record.calls == 1


async def test_a_context_in_use_is_refused_to_a_concurrent_request():
    provider = ScriptedProvider(default=Step(text="slow", delay=0.05))
    router = make_router(provider)
    ctx = RequestContext()
    errors = []

    async def second():
        while ctx.request is None:  # the first call has it
            await anyio.lowlevel.checkpoint()
        try:
            await router.chat(chat_body(), context=ctx)
        except ValueError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: router.chat(chat_body(), context=ctx))
        tg.start_soon(second)
    assert len(errors) == 1 and ctx.status == "ok" and provider.record.calls == 1


async def test_a_context_of_a_refused_request_is_not_used_again():
    router = make_router(ScriptedProvider())
    ctx = RequestContext()
    with pytest.raises(Exception, match="does not exist"):
        await router.chat({**chat_body(), "model": "nope"}, context=ctx)
    assert ctx.status == "error"
    with pytest.raises(ValueError, match="already used"):
        await router.chat(chat_body(), context=ctx)


# --- event hooks -------------------------------------------------------------------------


async def test_a_raising_on_chunk_hook_changes_nothing(caplog):
    class Broken(RouterHooks):
        def on_chunk(self, ctx):
            raise RuntimeError("hook bug")

    seen = []

    class Record(RouterHooks):
        async def after_request(self, ctx):
            seen.append((ctx.status, ctx.usage, ctx.cost))

    provider = ScriptedProvider(default=Step(text="a b c"))
    router = make_router(provider, hooks=[Record(), Broken()], price=Price(input=1.0, output=2.0))
    ctx = RequestContext()
    with caplog.at_level(logging.ERROR, logger="llmrouter.router"):
        pieces = [
            c.choices[0].delta.content async for c in router.stream(chat_body(), context=ctx) if c.choices
        ]
    assert "".join(p or "" for p in pieces) == "a b c"
    assert ctx.status == "ok" and ctx.error is None
    status, usage, cost = seen[0]
    assert status == "ok" and usage.completion_tokens == 3 and cost > 0
    assert "failed in on_chunk" in caplog.text and "hook bug" in caplog.text
