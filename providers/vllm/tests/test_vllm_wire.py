"""Pieces of the vllm provider that need no vLLM: wire translation, options, light import.

These run in the default suite (no `vllm` marker), so the provider's logic around the
engine is checked even where vLLM is not installed.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import msgspec
import pytest

from llmrouter.errors import (
    ConfigError,
    ContextWindowExceededError,
    InvalidRequestError,
    UnsupportedFeatureError,
    UpstreamError,
    UpstreamUnavailableError,
)
from llmrouter.types import ChatRequest, decode_chat_request

llmrouter_vllm = pytest.importorskip(
    "llmrouter_vllm", reason="llmrouter-vllm is not installed here: pip install --no-deps -e providers/vllm"
)
VLLMOptions, VLLMProvider, _wire = (
    llmrouter_vllm.VLLMOptions,
    llmrouter_vllm.VLLMProvider,
    llmrouter_vllm._wire,
)


@dataclass
class FakeLogprob:  # the shape of vllm.logprobs.Logprob
    logprob: float
    rank: int
    decoded_token: str | None


def test_import_does_not_pull_vllm_or_torch() -> None:
    code = "import sys, llmrouter_vllm; print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_options_from_config_and_engine_args() -> None:
    provider = VLLMProvider.from_config(
        "/models/x",
        {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "engine_args": {"block_size": 32}},
    )
    assert isinstance(provider.options, VLLMOptions)
    args = provider.options.named_engine_args()
    assert args["dtype"] == "float32" and args["max_model_len"] == 512 and args["enforce_eager"] is True
    assert "gpu_memory_utilization" not in args  # unset: vLLM's own default
    assert provider.options.engine_args == {"block_size": 32}
    with pytest.raises(ConfigError, match="max_modl_len"):
        VLLMProvider.from_config("/models/x", {"max_modl_len": 1}, path="models[a].deployments[0]")


@pytest.mark.anyio
async def test_not_started_provider_is_unhealthy_and_refuses_requests() -> None:
    provider = VLLMProvider("/models/x")
    health = await provider.health()
    assert not health.ok and "stopped" in health.detail
    assert provider.engine_stats() == {"state": "stopped", "in_flight": 0}
    request = decode_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(UpstreamUnavailableError):
        await provider.chat(request)
    await provider.aclose()  # closing a never-started provider is a no-op


def test_template_messages_maps_roles_and_text_parts() -> None:
    request = decode_chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ],
        }
    )
    messages = _wire.template_messages(request)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "user", "content": "Hello there"}
    assert messages[2]["content"] == "" and messages[2]["tool_calls"][0]["function"]["name"] == "f"
    assert messages[3] == {"role": "tool", "content": "42", "tool_call_id": "c1"}


def test_non_text_content_and_tools_are_unsupported() -> None:
    image = decode_chat_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        }
    )
    with pytest.raises(UnsupportedFeatureError) as caught:
        _wire.template_messages(image)
    assert caught.value.param == "messages[0].content"
    tools = decode_chat_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        }
    )
    with pytest.raises(UnsupportedFeatureError):
        _wire.check_chat_features(tools)
    no_tools = decode_chat_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "none",
        }
    )
    _wire.check_chat_features(no_tools)  # tools offered but not to be called: fine


def test_output_limit() -> None:
    assert _wire.output_limit(None, 10, 100, param="messages") == 90
    assert _wire.output_limit(5, 10, 100, param="messages") == 5
    assert _wire.output_limit(90, 10, 100, param="messages") == 90
    with pytest.raises(ContextWindowExceededError):
        _wire.output_limit(91, 10, 100, param="messages")
    with pytest.raises(ContextWindowExceededError) as caught:
        _wire.output_limit(None, 100, 100, param="prompt")
    assert caught.value.http_status == 400 and caught.value.param == "prompt"


def test_finish_reasons() -> None:
    assert _wire.finish_reason(None, request_id="r") is None
    assert _wire.finish_reason("stop", request_id="r") == "stop"
    assert _wire.finish_reason("length", request_id="r") == "length"
    assert _wire.finish_reason("repetition", request_id="r") == "stop"
    for engine_side in ("abort", "error"):
        with pytest.raises(UpstreamError, match=engine_side):
            _wire.finish_reason(engine_side, request_id="r")


def test_logprob_shapes() -> None:
    positions = [
        {5: FakeLogprob(-0.1, 1, "Hi"), 6: FakeLogprob(-2.5, 2, "Ho")},
        {7: FakeLogprob(-1.0, 2, None), 8: FakeLogprob(-0.5, 1, "!")},
    ]
    decode = {7: "?"}.__getitem__
    chat = _wire.chat_logprobs([5, 7], positions, 1, decode)
    assert chat is not None
    first, second = chat["content"]
    assert first["token"] == "Hi" and first["logprob"] == -0.1 and first["bytes"] == list(b"Hi")
    assert [t["token"] for t in first["top_logprobs"]] == ["Hi"]
    assert second["token"] == "?" and [t["token"] for t in second["top_logprobs"]] == ["!"]
    legacy = _wire.completion_logprobs([5, 7], positions, 2, decode, 10)
    assert legacy == {
        "tokens": ["Hi", "?"],
        "token_logprobs": [-0.1, -1.0],
        "top_logprobs": [{"Hi": -0.1, "Ho": -2.5}, {"!": -0.5, "?": -1.0}],
        "text_offset": [10, 12],
    }
    assert _wire.chat_logprobs([1], None, 1, decode) is None


def test_usage_is_exact_with_cached_tokens() -> None:
    usage = _wire.make_usage(10, 4, 8)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 4, 14)
    assert usage.cached_tokens == 8 and not usage.estimated
    assert _wire.make_usage(3, 1, 0).prompt_tokens_details is None


def test_top_logprobs_needs_logprobs() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
    with pytest.raises(InvalidRequestError):  # refused as the request is decoded
        decode_chat_request(body)
    built = msgspec.convert(body, ChatRequest)  # a struct built in code skips that check
    with pytest.raises(InvalidRequestError):
        _wire.chat_logprobs_count(built)
