"""The provider on a CUDA GPU (skipped where there is none)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from llmrouter_transformers import TransformersOptions, TransformersProvider

from llmrouter.types import decode_chat_request


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.anyio, pytest.mark.skipif(not _cuda(), reason="no CUDA GPU")]


def request(prompt: str, max_tokens: int) -> object:
    return decode_chat_request(
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
    )


@pytest.mark.parametrize("dtype", ["auto", "float32"])
async def test_cuda_batched_equals_solo(tiny_llama: Path, dtype: str) -> None:
    options = TransformersOptions(path=str(tiny_llama), device="auto", dtype=dtype)  # type: ignore[arg-type]
    async with TransformersProvider("tiny", options) as provider:
        assert provider.engine.device.type == "cuda"
        prompts = ["Hello there", "a much longer prompt with many more words in it", "😀 日本語"]
        solo = [
            (await provider.chat(request(p, 16 + i))).choices[0].message.content
            for i, p in enumerate(prompts)
        ]
        together: dict[int, str | None] = {}

        async def run(index: int) -> None:
            response = await provider.chat(request(prompts[index], 16 + index))
            together[index] = response.choices[0].message.content

        async with anyio.create_task_group() as tg:
            for index in range(len(prompts)):
                tg.start_soon(run, index)
        if dtype == "float32":
            assert [together[i] for i in range(len(prompts))] == solo
        else:  # half precision: padding may move the last bits; the batch must still complete
            assert all(together[i] for i in range(len(prompts)))
        health = await provider.health()
        assert health.ok and "cuda" in health.detail
