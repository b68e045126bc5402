"""Loading a causal LM and its tokenizer: device, dtype, hub access, progress.

Loading is blocking (seconds to minutes) and runs in a worker thread, never on the
event loop. A hub id is only fetched where the hub can be reached: with
``HF_HUB_OFFLINE`` set, or when the hub does not answer within a few seconds, the
load fails at once with an error naming the model and the setting, instead of
hanging in download retries.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmrouter.errors import ConfigError
from llmrouter_transformers.notices import notice, quiet_progress_bars

__all__ = ["DType", "LoadedModel", "hub_is_offline", "load_model", "resolve_device", "resolve_dtype"]

DType = Literal["auto", "float32", "bfloat16", "float16"]

_TRUE = {"1", "true", "yes", "on"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(slots=True)
class LoadedModel:
    """A model ready for generation."""

    model: Any
    tokenizer: Any
    device: Any
    dtype: Any
    source: str
    """The directory or hub id it was loaded from."""
    load_seconds: float


def resolve_device(device: str = "auto") -> Any:
    """The torch device for ``device``: ``auto`` picks CUDA, then MPS, then CPU."""
    import torch

    if device != "auto":
        try:
            return torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"transformers: invalid device {device!r}: {exc}") from exc
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: DType, device: Any) -> Any:
    """The torch dtype for ``dtype`` on ``device``.

    ``auto`` means bfloat16 on CUDA GPUs that support it (float16 on older ones),
    float16 on MPS and float32 on CPU, where half precision is slow without AVX-512.
    """
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def hub_is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` forbids downloads."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUE
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(timeout: float = 5.0) -> bool:
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        httpx.head(endpoint, timeout=timeout, follow_redirects=False)
    except httpx.HTTPError:
        return False
    return True


def _locate(source: str, *, revision: str | None) -> tuple[str, bool]:
    """Where to load ``source`` from, and whether only local files may be used.

    Raises:
        ConfigError: a hub id that is neither cached nor reachable.
    """
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser()), True
    if not _HUB_ID.fullmatch(source):
        raise ConfigError(f"transformers: model {source!r} is not a directory (nor a hub id like 'org/name')")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json", revision=revision)
    if isinstance(cached, str):
        return source, True
    if hub_is_offline():
        raise ConfigError(
            f"transformers: model {source!r} is not a local directory and not in the Hugging Face cache, "
            "and HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) forbids downloading it: "
            "download it where the hub is reachable, or point the deployment at a local model directory"
        )
    if not _hub_reachable():
        raise ConfigError(
            f"transformers: model {source!r} is not a local directory or cached, and the Hugging Face hub "
            f"({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) cannot be reached: "
            "use a local model directory, or set HF_HUB_OFFLINE=1 to fail fast"
        )
    return source, False


def load_model(
    source: str,
    *,
    device: str = "auto",
    dtype: DType = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer (blocking; call it from a worker thread).

    Args:
        source: a local model directory or a hub id (``org/name``).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        revision: hub revision (branch, tag or commit).
        trust_remote_code: allow the model's own Python code from the hub.
        attn_implementation: e.g. ``sdpa`` or ``eager``; None lets transformers pick.

    Raises:
        ConfigError: the model cannot be found, reached or loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    location, local_only = _locate(source, revision=revision)
    notice(f"loading {source} on {torch_device} ({str(torch_dtype).removeprefix('torch.')}) ...")
    quiet_progress_bars()
    started = time.perf_counter()
    kwargs: dict[str, Any] = {
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "local_files_only": local_only,
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model_kwargs = dict(kwargs, dtype=torch_dtype)
        if attn_implementation:
            model_kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(location, **model_kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"transformers: cannot load model {source!r}: {exc}") from exc
    model.to(torch_device)
    model.eval()
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out, so any id will do; EOS is what HF generate uses.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    elapsed = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters()) / 1e6
    notice(f"loaded {source} ({params:.1f}M parameters) in {elapsed:.1f} s")
    return LoadedModel(model, tokenizer, torch_device, torch_dtype, source, elapsed)
