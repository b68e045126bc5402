"""OpenRouterProvider against the fake OpenRouter, over httpx (the shared OpenAI-compatible client)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest
from fake_openrouter import API_KEY, FakeOpenRouter
from llmrouter_openrouter import OpenRouterOptions, OpenRouterProvider

from llmrouter.cache.entry import response_from_chunks
from llmrouter.config import Deployment, parse_config
from llmrouter.context import RequestContext
from llmrouter.errors import (
    AuthenticationError,
    ContextWindowExceededError,
    InsufficientCreditsError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    RateLimitError,
    UnsupportedFeatureError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamModelNotFoundError,
    UpstreamUnavailableError,
)
from llmrouter.router import Router
from llmrouter.types import ChatChunk, decode_chat_request, decode_completion_request

pytestmark = pytest.mark.anyio

MODEL = "openai/gpt-4o-mini"
REPLY = "Hello from the fake OpenRouter."


def chat_request(**fields: Any):
    return decode_chat_request(
        {"model": "x", "messages": [{"role": "user", "content": "Say hello please"}], **fields}
    )


def options(url: str, **fields: Any) -> OpenRouterOptions:
    return OpenRouterOptions(base_url=url, api_key=API_KEY, **fields)


@pytest.fixture
async def provider(openrouter_url: str) -> AsyncIterator[OpenRouterProvider]:
    async with OpenRouterProvider(MODEL, options(openrouter_url)) as p:
        yield p


def last(
    fake: FakeOpenRouter, path: str = "/api/v1/chat/completions"
) -> tuple[dict[str, str], dict[str, Any]]:
    headers, body = [(h, b) for p, h, b in fake.requests if p == path][-1]
    return headers, body


async def collect(stream: AsyncIterator[ChatChunk]) -> list[ChatChunk]:
    return [chunk async for chunk in stream]


# --- requests ---------------------------------------------------------------------------


async def test_chat_reports_openrouters_cost(
    provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter
) -> None:
    response = await provider.chat(chat_request())
    assert response.choices[0].message.content == REPLY
    usage = response.usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (4, 5)
    assert usage.cost == pytest.approx(4 * 0.00000015 + 5 * 0.0000006)
    assert usage.estimated is False
    headers, body = last(fake_openrouter)
    assert body["model"] == MODEL
    assert body["usage"] == {"include": True}
    assert headers["authorization"] == f"Bearer {API_KEY}"


async def test_stream_skips_processing_comments_and_ends_with_cost(
    provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter
) -> None:
    chunks = await collect(provider.stream(chat_request(stream=True)))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert final.usage.cost == pytest.approx(4 * 0.00000015 + 5 * 0.0000006)
    assert last(fake_openrouter)[1]["usage"] == {"include": True}


async def test_attribution_headers(openrouter_url: str, fake_openrouter: FakeOpenRouter) -> None:
    opts = options(openrouter_url, http_referer="https://example.com/app", x_title="Example App")
    async with OpenRouterProvider(MODEL, opts) as p:
        await p.chat(chat_request())
    headers, _ = last(fake_openrouter)
    assert headers["http-referer"] == "https://example.com/app"
    assert headers["x-title"] == "Example App"


async def test_routing_preferences_and_fallbacks_are_sent(
    openrouter_url: str, fake_openrouter: FakeOpenRouter
) -> None:
    opts = options(
        openrouter_url,
        provider_preferences={
            "order": ["openai", "azure"],
            "allow_fallbacks": False,
            "data_collection": "deny",
        },
        fallback_models=["anthropic/claude-3.5-haiku"],
        route="fallback",
        transforms=["middle-out"],
    )
    async with OpenRouterProvider(MODEL, opts) as p:
        # The client's own preferences merge under the deployment's; its model list is dropped.
        await p.chat(
            chat_request(provider={"sort": "price", "data_collection": "allow"}, models=["openai/o1-pro"])
        )
    _, body = last(fake_openrouter)
    assert body["provider"] == {
        "sort": "price",
        "order": ["openai", "azure"],
        "allow_fallbacks": False,
        "data_collection": "deny",
    }
    assert body["models"] == ["anthropic/claude-3.5-haiku"]
    assert body["route"] == "fallback"
    assert body["transforms"] == ["middle-out"]


async def test_client_routing_is_opt_in(openrouter_url: str, fake_openrouter: FakeOpenRouter) -> None:
    async with OpenRouterProvider(MODEL, options(openrouter_url)) as p:
        await p.chat(
            chat_request(models=["openai/o1-pro"], route="fallback", provider={"sort": "throughput"})
        )
    _, body = last(fake_openrouter)
    assert "models" not in body and "route" not in body
    assert body["provider"] == {"sort": "throughput"}
    async with OpenRouterProvider(MODEL, options(openrouter_url, client_routing=True)) as p:
        await p.chat(chat_request(models=["anthropic/claude-3.5-haiku"]))
    assert last(fake_openrouter)[1]["models"] == ["anthropic/claude-3.5-haiku"]


async def test_api_key_from_the_environment(openrouter_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", API_KEY)
    async with OpenRouterProvider(MODEL, OpenRouterOptions(base_url=openrouter_url)) as p:
        assert (await p.chat(chat_request())).choices[0].message.content == REPLY
    monkeypatch.delenv("OPENROUTER_API_KEY")
    with pytest.raises(AuthenticationError, match="OPENROUTER_API_KEY"):
        await OpenRouterProvider(MODEL, OpenRouterOptions(base_url=openrouter_url)).start()


async def test_legacy_completion(provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter) -> None:
    request = decode_completion_request({"model": "x", "prompt": "Once upon", "max_tokens": 2})
    response = await provider.complete(request)
    assert response.choices[0].text == "Hello from "
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.cost is not None
    chunks = [
        c async for c in provider.stream_complete(decode_completion_request({"model": "x", "prompt": "Once"}))
    ]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY
    assert chunks[-1].usage is not None and chunks[-1].usage.cost is not None


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type", "retryable"),
    [
        (402, InsufficientCreditsError, False),
        (429, RateLimitError, True),
        (502, UpstreamError, True),
        (503, UpstreamUnavailableError, True),
        (400, InvalidRequestError, False),
    ],
)
async def test_error_statuses(
    provider: OpenRouterProvider,
    fake_openrouter: FakeOpenRouter,
    status: int,
    error_type: type,
    retryable: bool,
) -> None:
    fake_openrouter.fail_status = status
    fake_openrouter.fail_message = f"fake {status}"
    fake_openrouter.fail_headers = {"Retry-After": "12"}
    fake_openrouter.fail_metadata = {"limit_source": "openrouter_credits"} if status == 402 else None
    with pytest.raises(error_type) as info:
        await provider.chat(chat_request())
    assert info.value.retryable is retryable
    assert info.value.retry_after == 12.0
    assert info.value.message == f"fake {status}"
    assert info.value.http_status == status if status != 502 else info.value.http_status == 502
    with pytest.raises(error_type):
        await collect(provider.stream(chat_request()))


@pytest.mark.parametrize(
    "message",
    [
        "No endpoints found that support tool use. To learn more about provider routing, visit: "
        "https://openrouter.ai/docs/provider-routing",
        "No endpoints found that support the provided 'tool_choice' value.",
        "No endpoints found that can handle the requested parameters.",
    ],
)
async def test_no_endpoint_for_what_the_request_asks_is_a_refusal(
    provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter, message: str
) -> None:
    # OpenRouter's 404: as a NotFoundError it counted against the deployment, and three
    # requests with tools to a model without them cooled OpenRouter down for everyone.
    fake_openrouter.fail_status = 404
    fake_openrouter.fail_message = message
    with pytest.raises(UnsupportedFeatureError) as info:
        await provider.chat(chat_request())
    assert info.value.http_status == 400 and info.value.code == "unsupported_feature"
    assert info.value.message == message
    with pytest.raises(UnsupportedFeatureError):
        await collect(provider.stream(chat_request()))


async def test_a_404_about_the_account_stays_the_deployments_fault(
    provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter
) -> None:
    fake_openrouter.fail_status = 404
    fake_openrouter.fail_message = "No endpoints found matching your data policy (Free model publication)."
    with pytest.raises(NotFoundError) as info:
        await provider.chat(chat_request())
    assert not isinstance(info.value, UnsupportedFeatureError)


RETIRED = "google/gemini-2.0-pro-exp-02-05:free"


async def test_a_model_openrouter_does_not_know_is_the_deployments_fault(openrouter_url: str) -> None:
    # OpenRouter's 400 "<id> is not a valid model ID": as an InvalidRequestError it was the
    # request's fault, and no other deployment or fallback was tried.
    async with OpenRouterProvider(RETIRED, options(openrouter_url)) as p:
        with pytest.raises(UpstreamModelNotFoundError) as info:
            await p.chat(chat_request())
        assert info.value.message.startswith(f"{RETIRED} is not a valid model ID")
        with pytest.raises(UpstreamModelNotFoundError):
            await collect(p.stream(chat_request()))


@pytest.mark.parametrize(
    ("settings", "sent", "error_type"),
    [
        ({"fallback_models": ["anthropic/claude-3-opus"]}, {}, UpstreamModelNotFoundError),
        ({"client_routing": True}, {"models": ["anthropic/claude-3-opus"]}, InvalidRequestError),
    ],
)
async def test_an_unknown_model_the_client_sent_stays_its_own_fault(
    openrouter_url: str,
    fake_openrouter: FakeOpenRouter,
    settings: dict[str, Any],
    sent: dict[str, Any],
    error_type: type,
) -> None:
    # Else a client could cool the deployment down for everyone with made-up ids.
    fake_openrouter.fail_status = 400
    fake_openrouter.fail_message = "anthropic/claude-3-opus is not a valid model ID"
    async with OpenRouterProvider(MODEL, options(openrouter_url, **settings)) as p:
        with pytest.raises(error_type) as info:
            await p.chat(chat_request(**sent))
    assert type(info.value) is error_type


async def test_a_retired_model_moves_the_request_on_to_the_fallback(
    openrouter_url: str, fake_openrouter: FakeOpenRouter
) -> None:
    config = parse_config(
        {
            "providers": {"openrouter": {"base_url": openrouter_url, "api_key": API_KEY}},
            "models": [
                {
                    "name": "fast",
                    "fallbacks": ["backup"],
                    "deployments": [{"provider": "openrouter", "model": RETIRED}],
                },
                {"name": "backup", "deployments": [{"provider": "openrouter", "model": MODEL}]},
            ],
        },
        env={},
    )
    async with Router.from_config(config) as router:
        response = await router.chat(
            {"model": "fast", "messages": [{"role": "user", "content": "Say hello"}]}
        )
    assert response.choices[0].message.content == REPLY
    assert [body["model"] for _, _, body in fake_openrouter.requests] == [RETIRED, MODEL]


async def test_bad_key_is_401(openrouter_url: str) -> None:
    async with OpenRouterProvider(
        MODEL, OpenRouterOptions(base_url=openrouter_url, api_key="sk-or-v1-wrong")
    ) as p:
        with pytest.raises(AuthenticationError, match="User not found"):
            await p.chat(chat_request())
        health = await p.health()
        assert health.ok is False and "User not found" in health.detail


async def test_error_in_a_200_body(provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.error_in_body = True
    with pytest.raises(UpstreamError) as info:
        await provider.chat(chat_request())
    assert info.value.retryable is True


async def test_a_failed_choice_in_a_200_body_keeps_the_errors_status_and_words(
    provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter
) -> None:
    # Before: a generic 502 "the model failed while answering", the cause dropped.
    fake_openrouter.error_in_body = {"code": 429, "message": "Rate limit exceeded upstream: retry shortly"}
    with pytest.raises(RateLimitError) as info:
        await provider.chat(chat_request())
    assert (info.value.http_status, info.value.message) == (
        429,
        "Rate limit exceeded upstream: retry shortly",
    )
    with pytest.raises(RateLimitError):
        await provider.complete(decode_completion_request({"model": "x", "prompt": "Once"}))


async def test_a_failed_legacy_completion_in_a_200_body(
    provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter
) -> None:
    fake_openrouter.error_in_body = True  # before: returned, billed and cacheable
    with pytest.raises(UpstreamError) as info:
        await provider.complete(decode_completion_request({"model": "x", "prompt": "Once"}))
    assert info.value.retryable is True


@pytest.mark.parametrize(
    ("error", "error_type", "status"),
    [
        ({"code": 429, "message": "Rate limit exceeded upstream"}, RateLimitError, 429),
        (
            {"code": 400, "message": "This endpoint's maximum context length is 8192 tokens."},
            ContextWindowExceededError,
            400,
        ),
        ({"code": 502, "message": "Provider returned error"}, UpstreamError, 502),
    ],
)
async def test_an_error_alone_in_a_200_body_keeps_its_status(
    provider: OpenRouterProvider,
    fake_openrouter: FakeOpenRouter,
    error: dict[str, Any],
    error_type: type,
    status: int,
) -> None:
    # Before: "answered no choices", a 502 whatever the error said.
    fake_openrouter.error_only = error
    with pytest.raises(error_type) as info:
        await provider.chat(chat_request())
    assert (info.value.http_status, info.value.message) == (status, error["message"])
    with pytest.raises(error_type):
        await provider.complete(decode_completion_request({"model": "x", "prompt": "Once"}))


async def test_a_wrapped_upstream_error_is_read_for_what_it_says(
    provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter
) -> None:
    # OpenRouter passes its provider's error on in metadata.raw: a context length there is
    # the request's context length (before: a plain 400 "Provider returned error").
    fake_openrouter.fail_status = 400
    fake_openrouter.fail_message = "Provider returned error"
    fake_openrouter.fail_metadata = {
        "provider_name": "OpenAI",
        "raw": '{"error": {"message": "This model\'s maximum context length is 128000 tokens."}}',
    }
    with pytest.raises(ContextWindowExceededError) as info:
        await provider.chat(chat_request())
    assert info.value.message.startswith("Provider returned error: ")
    assert "maximum context length is 128000" in info.value.message


async def test_error_event_mid_stream(provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.error_after = 2
    seen: list[ChatChunk] = []
    with pytest.raises(UpstreamError) as info:
        async for chunk in provider.stream(chat_request()):
            seen.append(chunk)
    assert len(seen) == 2
    assert "Provider disconnected unexpectedly" in info.value.message
    assert info.value.retryable is True


async def test_broken_stream(provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.break_after = 1
    with pytest.raises(UpstreamConnectionError):
        await collect(provider.stream(chat_request()))


# --- cancellation ----------------------------------------------------------------------


async def wait_for_disconnect(fake: FakeOpenRouter, bound: float = 1.0) -> None:
    started = time.monotonic()
    # The server thread sets a threading.Event, which an anyio.Event cannot wait on.
    while not fake.disconnected.is_set() and time.monotonic() - started < bound:  # noqa: ASYNC110
        await anyio.sleep(0.01)


async def test_closing_a_stream_closes_the_upstream_connection(
    provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter
) -> None:
    fake_openrouter.token_delay = 0.2
    fake_openrouter.reply = " ".join(["word"] * 50)
    stream = provider.stream(chat_request())
    await stream.__anext__()
    await stream.aclose()
    await wait_for_disconnect(fake_openrouter)
    assert fake_openrouter.disconnects == ["/api/v1/chat/completions"]


async def test_cancelling_a_chat_closes_the_upstream_connection(
    provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter
) -> None:
    fake_openrouter.token_delay = 0.2
    with anyio.move_on_after(0.3):
        await provider.chat(chat_request())
    await wait_for_disconnect(fake_openrouter)
    assert fake_openrouter.disconnects == ["/api/v1/chat/completions"]


# --- models, health, zero-config, router ---------------------------------------------------


async def test_list_models_and_health(provider: OpenRouterProvider) -> None:
    ids = [card.id for card in await provider.list_models()]
    assert "openai/gpt-4o-mini" in ids and "openrouter/auto" in ids
    health = await provider.health()
    assert health.ok is True and "$4.50 left" in health.detail


async def test_discover_needs_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    assert await OpenRouterProvider.discover() == []
    assert "OPENROUTER_API_KEY not set" in OpenRouterProvider.discovery_note()
    monkeypatch.setenv("OPENROUTER_API_KEY", API_KEY)
    monkeypatch.setenv("LLMROUTER_OPENROUTER_MODELS", "openai/gpt-4o-mini, anthropic/claude-3.5-haiku")
    groups = await OpenRouterProvider.discover()
    assert [g.name for g in groups] == [
        "openrouter/auto",
        "openrouter/openai/gpt-4o-mini",
        "openrouter/anthropic/claude-3.5-haiku",
    ]
    assert groups[1].aliases == ["openai/gpt-4o-mini"]
    assert groups[1].deployments[0].model == "openai/gpt-4o-mini"
    assert "openrouter/auto" in OpenRouterProvider.discovery_note()


async def test_router_records_the_provider_reported_cost(
    openrouter_url: str, fake_openrouter: FakeOpenRouter
) -> None:
    router = Router()
    router.add_deployment(
        "cheap",
        OpenRouterProvider(MODEL, options(openrouter_url)),
        Deployment(provider="openrouter", model=MODEL),
    )
    expected = 4 * 0.00000015 + 5 * 0.0000006
    async with router:
        ctx = RequestContext()
        await router.chat(
            {"model": "cheap", "messages": [{"role": "user", "content": "Say hello please"}]}, context=ctx
        )
        assert (ctx.cost, ctx.cost_source) == (pytest.approx(expected), "provider")
        ctx = RequestContext()
        chunks = [
            c
            async for c in router.stream(
                {
                    "model": "cheap",
                    "stream": True,
                    "messages": [{"role": "user", "content": "Say hello please"}],
                },
                context=ctx,
            )
        ]
        assert chunks and all(c.usage is None for c in chunks)  # the client did not ask for usage
        assert (ctx.cost, ctx.cost_source) == (pytest.approx(expected), "provider")


# --- reasoning, citations, prompt caching ---------------------------------------------------


CITATION = {"type": "url_citation", "url_citation": {"url": "https://example.com/paris", "title": "Paris"}}


async def test_reasoning_and_citations_reach_the_client(
    provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter
) -> None:
    fake_openrouter.reasoning = "The user greets me. "
    fake_openrouter.annotations = [CITATION]
    detail = {"type": "reasoning.text", "text": "The user greets me. ", "format": "unknown", "index": 0}

    response = await provider.chat(chat_request(reasoning={"effort": "low"}))
    message = response.choices[0].message
    assert (message.content, message.reasoning) == (REPLY, "The user greets me. ")
    assert message.reasoning_details == [detail] and message.annotations == [CITATION]
    assert response.usage is not None and response.usage.completion_tokens_details is not None
    assert response.usage.completion_tokens_details.reasoning_tokens == 4
    wire = msgspec.to_builtins(response)["choices"][0]["message"]  # what the service sends
    assert wire["reasoning"] == "The user greets me. " and wire["annotations"] == [CITATION]
    assert last(fake_openrouter)[1]["reasoning"] == {"effort": "low"}

    chunks = await collect(provider.stream(chat_request(stream=True)))
    assert "".join(c.choices[0].delta.reasoning or "" for c in chunks if c.choices) == "The user greets me. "
    streamed = response_from_chunks(chunks).choices[0].message
    assert (streamed.content, streamed.reasoning, streamed.annotations) == (
        REPLY,
        message.reasoning,
        [CITATION],
    )
    assert [d["text"] for d in streamed.reasoning_details or []] == ["The ", "user ", "greets ", "me. "]


async def test_reasoning_details_and_cache_breakpoints_go_upstream_as_sent(
    provider: OpenRouterProvider, fake_openrouter: FakeOpenRouter
) -> None:
    breakpoint_ = {"type": "ephemeral", "ttl": "1h"}
    details = [
        {"type": "reasoning.encrypted", "data": "opaque==", "format": "anthropic-claude-v1", "index": 0}
    ]
    messages = [
        {
            "role": "system",
            "content": [{"type": "text", "text": "A long manual.", "cache_control": breakpoint_}],
        },
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_details": details, "cache_control": breakpoint_},
        {"role": "user", "content": "Again"},
    ]
    await provider.chat(decode_chat_request({"model": "x", "messages": messages}))
    assert last(fake_openrouter)[1]["messages"] == messages


async def test_a_direct_name_openrouter_does_not_know_is_the_clients_404_every_time(
    openrouter_url: str, fake_openrouter: FakeOpenRouter
) -> None:
    # The client typed it: counted as the name's failure, it cooled down after three
    # tries and then answered 503 "not available right now", which the SDKs retry.
    config = parse_config(
        {
            "providers": {"openrouter": {"base_url": openrouter_url, "api_key": API_KEY}},
            "router": {"cooldown": {"failures": 1, "seconds": 60}},
        },
        env={},
    )
    async with Router.from_config(config) as router:
        for _ in range(3):
            with pytest.raises(ModelNotFoundError) as info:
                await router.chat(
                    {"model": f"openrouter/{RETIRED}", "messages": [{"role": "user", "content": "hi"}]}
                )
            assert type(info.value) is ModelNotFoundError and info.value.param == "model"
        readiness = await router.readiness(probe=False)
    assert [d["failures"] for d in readiness["deployments"]] == [0]
    assert len(fake_openrouter.requests) == 3


async def test_a_direct_name_whose_fallback_model_is_unknown_is_the_operators_failure(
    openrouter_url: str, fake_openrouter: FakeOpenRouter
) -> None:
    # The unknown id is a provider-wide fallback_models entry, not the client's model:
    # the client was told its (valid) model did not exist, and nothing was counted.
    fake_openrouter.fail_status = 400
    fake_openrouter.fail_message = "anthropic/claude-3-opus is not a valid model ID"
    config = parse_config(
        {
            "providers": {
                "openrouter": {
                    "base_url": openrouter_url,
                    "api_key": API_KEY,
                    "fallback_models": ["anthropic/claude-3-opus"],
                }
            }
        },
        env={},
    )
    async with Router.from_config(config) as router:
        with pytest.raises(UpstreamModelNotFoundError) as info:
            await router.chat(
                {"model": f"openrouter/{MODEL}", "messages": [{"role": "user", "content": "hi"}]}
            )
        assert info.value.model == "anthropic/claude-3-opus"
        readiness = await router.readiness(probe=False)
    assert [d["failures"] for d in readiness["deployments"]] == [1]
