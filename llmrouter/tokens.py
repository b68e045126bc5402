"""Token counting for usage that a provider did not report.

OpenAI-family models are counted with tiktoken (``o200k_base`` for the gpt-4o / o-series
generation, ``cl100k_base`` otherwise). tiktoken normally downloads its BPE files; here
they come from the ``bpe-openai`` package and are unpacked into a private
``TIKTOKEN_CACHE_DIR`` under the names tiktoken looks for, so no network call is made.
Without either package, a conservative estimate (4 characters a token) is used.
Local providers count with their own tokenizer and never come here.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from llmrouter.types import ChatMessage, ImagePart, Tool, message_text

__all__ = [
    "count_messages",
    "count_prompt",
    "count_text",
    "encoding_loaded",
    "encoding_name_for",
    "preload_encodings",
    "tools_text",
]

_BLOB = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4", "chatgpt-4o", "gpt-oss")
# Every message costs a few tokens of framing (role, separators); the reply is primed with 3.
_TOKENS_PER_MESSAGE = 3
_REPLY_PRIMING = 3
_LOW_DETAIL_IMAGE = 85
_IMAGE = 765
"""What an image part counts when nobody says: OpenAI's tokens for an image at low
detail, else for a 1024x1024 one at high detail (85 + 4 tiles of 170); its real size is
not known without fetching it. Counted as nothing, an image's prompt was missing from a
priced request's budget reservation."""


def encoding_name_for(model: str) -> str:
    base = model.rsplit("/", 1)[-1].lower()
    return "o200k_base" if base.startswith(_O200K_PREFIXES) else "cl100k_base"


def _bpe_data_dir() -> Path | None:
    # Located without importing bpe_openai: its import loads a tokenizer of its own
    # (66 MB, ~0.8 s) and only its data files are needed.
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _prepare_cache_dir() -> str | None:
    # Imported here, once per encoding loaded: with tempfile come shutil, bz2 and lzma,
    # ~8 ms that ``import llmrouter`` need not pay.
    import gzip
    import hashlib
    import tempfile

    data = _bpe_data_dir()
    if data is None:
        return None
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "llmrouter-tiktoken"
    )
    os.makedirs(cache_dir, exist_ok=True)
    for name in ("cl100k_base", "o200k_base"):
        target = os.path.join(cache_dir, hashlib.sha1(_BLOB.format(name).encode()).hexdigest())
        if os.path.exists(target):
            continue
        packed = data / f"{name}.tiktoken.gz"
        if not packed.is_file():
            continue
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "wb") as out:
            out.write(gzip.decompress(packed.read_bytes()))
        os.replace(tmp, target)
    return cache_dir


_loaded: dict[str, Any] = {}
_load_lock = threading.Lock()


def _encoding(name: str) -> Any:
    # Each encoding costs 70-95 MB of memory and 0.3-1 s to load: load it once, on first
    # need, and never twice when two threads ask at the same time.
    if name in _loaded:
        return _loaded[name]
    with _load_lock:
        if name not in _loaded:
            _loaded[name] = _load_encoding(name)
        return _loaded[name]


def _load_encoding(name: str) -> Any:
    try:
        import tiktoken
    except ImportError:
        return None
    cache_dir = _prepare_cache_dir()
    if cache_dir is None and "TIKTOKEN_CACHE_DIR" not in os.environ:
        return None
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", cache_dir or "")
    try:
        return tiktoken.get_encoding(name)
    except Exception:  # noqa: BLE001 - no BPE file offline: fall back to the estimate
        return None


def count_text(text: str, model: str = "") -> int:
    """Tokens in ``text`` for ``model``'s tokenizer family (estimated without tiktoken)."""
    if not text:
        return 0
    encoding = _encoding(encoding_name_for(model))
    if encoding is None:
        return max(1, (len(text) + 3) // 4)
    return len(encoding.encode(text, disallowed_special=()))


def count_prompt(prompt: str | list[Any], model: str = "") -> int:
    """Tokens of a legacy completion's ``prompt``, in every form it takes: a string, a
    list of strings, a list of token ids, or a list of token-id lists (ids count one each)."""
    if isinstance(prompt, str):
        return count_text(prompt, model)
    if prompt and isinstance(prompt[0], int):
        return len(prompt)
    return sum(count_text(part, model) if isinstance(part, str) else len(part) for part in prompt)


def count_messages(messages: Sequence[ChatMessage], model: str = "") -> int:
    """Prompt tokens of a chat, framing included (OpenAI's counting recipe)."""
    total = _REPLY_PRIMING
    for message in messages:
        total += _TOKENS_PER_MESSAGE + count_text(message_text(message), model)
        if message.name:
            total += 1 + count_text(message.name, model)
        for call in message.tool_calls or ():
            # A custom call's .function is an empty placeholder: its text is .custom's.
            total += count_text(call.function.name, model) + count_text(call.function.arguments, model)
            if call.custom is not None:
                total += count_text(call.custom.name, model) + count_text(call.custom.input, model)
        legacy = message.function_call
        if legacy is not None:
            total += count_text(legacy.name, model) + count_text(legacy.arguments, model)
        if message.content.__class__ is list:
            for part in message.content:
                if part.__class__ is ImagePart:
                    total += _LOW_DETAIL_IMAGE if part.image_url.detail == "low" else _IMAGE
    return total


def tools_text(tools: Sequence[Tool] | None) -> str:
    """A request's tool definitions as the text their prompt tokens are counted in: their
    JSON (upstreams render them more compactly, so the count bounds theirs from above)."""
    return msgspec.json.encode(tools).decode() if tools else ""


def encoding_loaded(model: str) -> bool:
    """Whether counting for ``model`` is ready (no file to read, no stall)."""
    return encoding_name_for(model) in _loaded


def preload_encodings(models: Sequence[str]) -> None:
    """Load the encodings these models use (0.3-1 s and 70-95 MB each, once).

    Blocking: call it in a worker thread (the router does), so that no request stalls
    the event loop while tiktoken reads its BPE file.
    """
    for name in {encoding_name_for(model) for model in models}:
        _encoding(name)
