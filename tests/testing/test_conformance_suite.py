"""The conformance suite catches broken providers (it is run here against deliberately bad ones)."""

import re

import pytest

pytest_plugins = ["pytester"]

BROKEN = """
import msgspec
import pytest
from llmrouter_remote import RemoteProvider
from llmrouter.testing.conformance import ProviderConformance
from llmrouter.testing.upstream import FakeUpstream

STORY = "The quick brown fox jumps over the lazy dog. " * 40


class BadUsage(RemoteProvider):
    async def chat(self, request):
        response = await super().chat(request)
        usage = msgspec.structs.replace(response.usage, total_tokens=response.usage.total_tokens + 1)
        return msgspec.structs.replace(response, usage=usage)


class NoUsageChunk(RemoteProvider):
    async def stream(self, request):
        async for chunk in super().stream(request):
            if chunk.usage is None:
                yield chunk


class IgnoresStop(RemoteProvider):
    async def chat(self, request):
        return await super().chat(msgspec.structs.replace(request, stop=None))


@pytest.fixture(scope="module")
def upstream():
    with FakeUpstream(reply=STORY, delay_ms=5) as up:
        yield up


class Base(ProviderConformance):
    supports_completions = True
    deterministic = True
    provider_class = RemoteProvider

    @pytest.fixture
    async def provider(self, upstream):
        async with self.provider_class("fake-model", base_url=upstream.base_url) as p:
            yield p


class TestBadUsage(Base):
    provider_class = BadUsage


class TestNoUsageChunk(Base):
    provider_class = NoUsageChunk


class TestIgnoresStop(Base):
    provider_class = IgnoresStop
"""


def test_conformance_catches_broken_providers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_broken_providers=BROKEN)
    result = pytester.runpytest_subprocess("-q", "-p", "anyio", "-o", "anyio_mode=strict")
    outcomes = result.parseoutcomes()
    failed = {m.group(1) for line in result.outlines if (m := re.match(r"FAILED \S+?::(\w+::\w+)", line))}
    assert "TestBadUsage::test_chat_returns_choices_and_usage" in failed
    assert "TestBadUsage::test_concurrent_chats" in failed
    assert "TestNoUsageChunk::test_stream_concatenates_and_ends_with_usage" in failed
    assert "TestIgnoresStop::test_stop_strings_end_the_answer" in failed
    assert not any(name.startswith("TestNoUsageChunk::test_chat") for name in failed)
    assert outcomes["passed"] > 30, outcomes
