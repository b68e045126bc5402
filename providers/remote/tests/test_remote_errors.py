"""RemoteProvider against a misbehaving upstream: every failure becomes an error from the tree."""

import email.utils
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from llmrouter_remote import RemoteProvider

from llmrouter.errors import (
    AuthenticationError,
    ConfigError,
    ContextWindowExceededError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UpstreamAuthenticationError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from llmrouter.testing.conformance import collect_stream
from llmrouter.testing.upstream import Behaviour, FakeUpstream
from llmrouter.types import ChatRequest, decode_chat_request

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def errors_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(reply="one two three four five six seven eight", models=["fake-model"]) as upstream:
        yield upstream


@pytest.fixture
async def remote(errors_upstream: FakeUpstream) -> AsyncIterator[RemoteProvider]:
    errors_upstream.reset()
    async with RemoteProvider("fake-model", base_url=errors_upstream.base_url, read_timeout=5) as provider:
        yield provider


def chat(**fields: object) -> ChatRequest:
    return decode_chat_request(
        {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


async def call(provider: RemoteProvider, streaming: bool) -> object:
    if streaming:
        return await collect_stream(provider.stream(chat(stream=True)))
    return await provider.chat(chat())


@pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])
@pytest.mark.parametrize(
    ("behaviour", "error_type", "retryable", "retry_after"),
    [
        ("rate_limit", RateLimitError, True, 2.0),
        ("server_error", UpstreamError, True, None),
        ("unavailable", UpstreamUnavailableError, True, 1.0),
        ("bad_request", InvalidRequestError, False, None),
        ("context_length", ContextWindowExceededError, False, None),
        ("not_found", NotFoundError, False, None),
        ("unauthorized", AuthenticationError, False, None),
    ],
)
async def test_http_errors_are_translated(
    remote: RemoteProvider,
    errors_upstream: FakeUpstream,
    streaming: bool,
    behaviour: str,
    error_type: type[Exception],
    retryable: bool,
    retry_after: float | None,
) -> None:
    errors_upstream.enqueue(behaviour)
    with pytest.raises(error_type) as caught:
        await call(remote, streaming)
    error = caught.value
    assert error.retryable is retryable
    assert error.retry_after == retry_after
    assert error.provider == "remote"
    expected = errors_upstream.last_request
    assert expected.behaviour == behaviour
    assert error.message  # the upstream's own message is kept
    assert "fake" not in type(error).__name__.lower()


async def test_upstream_message_and_code_are_kept(
    remote: RemoteProvider, errors_upstream: FakeUpstream
) -> None:
    errors_upstream.enqueue("not_found")
    with pytest.raises(NotFoundError) as caught:
        await remote.chat(chat())
    assert caught.value.message == "no such model"
    assert caught.value.code == "model_not_found"
    assert caught.value.http_status == 404


@pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])
@pytest.mark.parametrize(
    "code", ["model_not_allowed", "model_not_found", "unsupported_country_region_territory"]
)
async def test_a_403_refusing_the_deployments_credentials_is_an_upstream_authentication_error(
    remote: RemoteProvider, errors_upstream: FakeUpstream, streaming: bool, code: str
) -> None:
    # A node's key that may not use the model (an OpenAI project's, an account's region):
    # the deployment's fault, as a 401 is, not the client's key.
    errors_upstream.enqueue(
        Behaviour(status=403, error_type="permission_error", error_code=code, error_message="not this key")
    )
    with pytest.raises(UpstreamAuthenticationError) as caught:
        await call(remote, streaming)
    error = caught.value
    assert (error.http_status, error.code) == (502, "upstream_authentication_failed")
    assert not error.retryable and error.headers()["x-should-retry"] == "false"
    assert f"refused this deployment's credentials ({code}): not this key" in error.message


async def test_a_403_without_a_credential_code_stays_the_requests(
    remote: RemoteProvider, errors_upstream: FakeUpstream
) -> None:
    # A node passing on OpenRouter's moderation refusal sends no code: that prompt's refusal.
    errors_upstream.enqueue(Behaviour(status=403, error_type="permission_error", error_message="flagged"))
    with pytest.raises(PermissionDeniedError):
        await remote.chat(chat())


async def test_retry_after_as_http_date(remote: RemoteProvider, errors_upstream: FakeUpstream) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    errors_upstream.enqueue(Behaviour(status=429, retry_after=when, error_message="later"))
    with pytest.raises(RateLimitError) as caught:
        await remote.chat(chat())
    assert caught.value.retry_after is not None
    assert 25 <= caught.value.retry_after <= 31


async def test_connection_refused(errors_upstream: FakeUpstream) -> None:
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with RemoteProvider("fake-model", base_url=f"http://127.0.0.1:{port}/v1") as provider:
        with pytest.raises(UpstreamConnectionError) as caught:
            await provider.chat(chat())
        assert caught.value.retryable and caught.value.provider == "remote"
        with pytest.raises(UpstreamConnectionError):
            await collect_stream(provider.stream(chat(stream=True)))
        health = await provider.health()
        assert not health.ok and health.detail


async def test_stream_broken_mid_way(remote: RemoteProvider, errors_upstream: FakeUpstream) -> None:
    errors_upstream.enqueue("break_stream")
    received = []
    with pytest.raises(UpstreamConnectionError) as caught:
        async for chunk in remote.stream(chat(stream=True)):
            received.append(chunk)
    assert caught.value.retryable
    # The role chunk and two content chunks arrived before the connection dropped.
    assert "".join(c.delta.content or "" for chunk in received for c in chunk.choices) == "one two"


async def test_chat_body_cut_short(remote: RemoteProvider, errors_upstream: FakeUpstream) -> None:
    errors_upstream.enqueue("break_stream")
    with pytest.raises(UpstreamConnectionError):
        await remote.chat(chat())


async def test_error_event_mid_stream(remote: RemoteProvider, errors_upstream: FakeUpstream) -> None:
    errors_upstream.enqueue("error_event")
    received = []
    with pytest.raises(UpstreamError) as caught:
        async for chunk in remote.stream(chat(stream=True)):
            received.append(chunk)
    assert caught.value.message == "engine died"
    assert caught.value.provider == "remote"
    assert len(received) == 3  # role chunk + two content chunks


async def test_error_event_with_status_code(remote: RemoteProvider, errors_upstream: FakeUpstream) -> None:
    # OpenRouter-style: a numeric code in the mid-stream error names the status.
    errors_upstream.enqueue(Behaviour(error_after=1, error_code="429", error_message="provider busy"))
    with pytest.raises(RateLimitError) as caught:
        await collect_stream(remote.stream(chat(stream=True)))
    assert caught.value.retryable and caught.value.message == "provider busy"


@pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])
async def test_invalid_json_is_an_upstream_error(
    remote: RemoteProvider, errors_upstream: FakeUpstream, streaming: bool
) -> None:
    errors_upstream.enqueue("invalid_json")
    with pytest.raises(UpstreamError, match="invalid"):
        await call(remote, streaming)


@pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])
async def test_first_byte_timeout(errors_upstream: FakeUpstream, streaming: bool) -> None:
    async with RemoteProvider("fake-model", base_url=errors_upstream.base_url, read_timeout=0.2) as provider:
        errors_upstream.enqueue("slow_first_byte")
        started = time.monotonic()
        with pytest.raises(UpstreamTimeoutError) as caught:
            await call(provider, streaming)
        assert time.monotonic() - started < 2.5
        assert caught.value.retryable and caught.value.http_status == 504
        # The upstream sees the abandoned request's connection closed.
        assert await errors_upstream.last_request.wait_disconnected(2.0)


async def test_stall_between_chunks_times_out(errors_upstream: FakeUpstream) -> None:
    async with RemoteProvider("fake-model", base_url=errors_upstream.base_url, read_timeout=0.3) as provider:
        errors_upstream.enqueue(Behaviour(delay_ms=1000))
        with pytest.raises(UpstreamTimeoutError):
            await collect_stream(provider.stream(chat(stream=True)))


async def test_missing_usage_is_estimated(remote: RemoteProvider, errors_upstream: FakeUpstream) -> None:
    errors_upstream.enqueue("no_usage", "no_usage")
    response = await remote.chat(chat())
    assert response.usage is not None and response.usage.estimated
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0
    chunks = await collect_stream(remote.stream(chat(stream=True)))
    usage = chunks[-1].usage
    assert usage is not None and usage.estimated and chunks[-1].choices == []
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens == response.usage.completion_tokens


async def test_reported_usage_is_not_estimated(remote: RemoteProvider) -> None:
    response = await remote.chat(chat())
    assert response.usage is not None and not response.usage.estimated
    assert response.usage.completion_tokens == 8


async def test_api_key_option_and_env(errors_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeUpstream(api_key="s3cret") as guarded:
        async with RemoteProvider("fake-model", base_url=guarded.base_url) as anonymous:
            with pytest.raises(AuthenticationError):
                await anonymous.chat(chat())
            assert not (await anonymous.health()).ok
        async with RemoteProvider("fake-model", base_url=guarded.base_url, api_key="s3cret") as keyed:
            assert (await keyed.chat(chat())).choices
        monkeypatch.setenv("REMOTE_TEST_KEY", "s3cret")
        async with RemoteProvider(
            "fake-model", base_url=guarded.base_url, api_key_env="REMOTE_TEST_KEY"
        ) as env:
            assert (await env.health()).ok
        assert guarded.last_request.headers["authorization"] == "Bearer s3cret"
    monkeypatch.delenv("REMOTE_TEST_KEY")
    with pytest.raises(ConfigError, match="REMOTE_TEST_KEY"):
        await RemoteProvider("m", base_url="http://127.0.0.1:1", api_key_env="REMOTE_TEST_KEY").start()
