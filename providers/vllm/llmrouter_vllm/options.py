"""Deployment options of the ``vllm`` provider (validated when the config is loaded)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from llmrouter.provider import ProviderOptions

__all__ = ["VLLMOptions"]

# Checked as the config is read, not by vLLM's engine as it starts (the deployment dead).
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]


class VLLMOptions(ProviderOptions):
    """Deployment keys of the ``vllm`` provider (the deployment's ``model`` is the model path).

    Attributes:
        dtype: weights/activations dtype (``auto``, ``float32``, ``bfloat16``, ``float16``).
        max_model_len: context length; default the model's own.
        gpu_memory_utilization: share of GPU memory vLLM may take (GPU only).
        tensor_parallel_size: number of GPUs to shard the model over.
        enforce_eager: skip CUDA-graph capture (faster start, slower decode).
        kv_cache_space_gib: KV-cache size on CPU; sets ``VLLM_CPU_KVCACHE_SPACE`` when unset.
        multiprocessing: run the engine core in its own process (vLLM's default); False sets
            ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` for the whole process. None leaves it alone.
        tokenizer: tokenizer path when it is not beside the model.
        trust_remote_code: let the model directory run its own Python code.
        seed: the engine's global seed.
        engine_args: any other ``vllm.AsyncEngineArgs`` field; wins over the keys above.
    """

    dtype: str = "auto"
    max_model_len: AtLeastOne | None = None
    gpu_memory_utilization: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    tensor_parallel_size: AtLeastOne = 1
    enforce_eager: bool = False
    kv_cache_space_gib: int | None = None
    multiprocessing: bool | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    seed: int | None = None
    engine_args: dict[str, Any] = msgspec.field(default_factory=dict)

    def named_engine_args(self) -> dict[str, Any]:
        """The named options as ``AsyncEngineArgs`` keywords (unset ones left to vLLM)."""
        args: dict[str, Any] = {
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enforce_eager": self.enforce_eager,
            "trust_remote_code": self.trust_remote_code,
        }
        optional = {
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "tokenizer": self.tokenizer,
            "seed": self.seed,
        }
        args.update({key: value for key, value in optional.items() if value is not None})
        return args
