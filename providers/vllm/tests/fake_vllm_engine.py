"""A scripted stand-in for vLLM's engine, to test the vllm provider where vLLM is absent.

:class:`FakeBackend` is a module shaped like ``llmrouter_vllm._engine`` (what the
provider imports as it starts); put it in ``sys.modules`` under that name and
``VLLMProvider.start()`` builds a :class:`FakeEngine` through the real start path.
The engine answers each request with the :class:`RequestOutput` list its ``script``
returns, in the shapes vLLM's ``AsyncLLM.generate`` yields (read by attribute, as the
provider reads vLLM's own). Its tokenizer has one token per character (the token id is
the character's code point), so token counts and text offsets are easy to reckon.

Knobs: ``FakeBackend(hold_build=True)`` holds the build in its worker thread until
``release_build`` is set (``building`` is set once it waits), ``build_error`` makes the
build raise; ``CharTokenizer(hold_render=True)`` holds chat-template rendering the same
way (``rendering`` / ``release_render``). What it saw: ``FakeBackend.sampling`` (the
keywords of each ``make_sampling_params`` call), ``FakeEngine.aborted`` and
``FakeEngine.shut_down``.
"""

from __future__ import annotations

import threading
import types
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

__all__ = [
    "CharTokenizer",
    "CompletionOutput",
    "FakeBackend",
    "FakeEngine",
    "Logprob",
    "RequestOutput",
    "answer",
]

VOCABULARY = 1024
_WAIT_S = 10.0  # a held thread gives up after this, so that a failing test cannot hang


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int
    decoded_token: str | None


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput (one choice)
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput
    request_id: str
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int | None = 0


Script = Callable[[str, Any], list[RequestOutput]]
"""The outputs for one request, from its request id and sampling params."""


def answer(text: str) -> Script:
    """A script that answers every request with ``text`` in one finished output."""

    def script(request_id: str, params: Any) -> list[RequestOutput]:
        tokens = [ord(char) for char in text]
        return [RequestOutput(request_id, [CompletionOutput(0, text, tokens, finish_reason="stop")], True)]

    return script


class CharTokenizer:
    """One token per character; the chat template writes ``<role>content`` per message."""

    def __init__(self, *, hold_render: bool = False) -> None:
        self.hold_render = hold_render
        self.rendering = threading.Event()
        self.release_render = threading.Event()

    def apply_chat_template(self, messages: list[dict[str, Any]], **_: Any) -> str:
        if self.hold_render:
            self.rendering.set()
            self.release_render.wait(_WAIT_S)
        return "".join(f"<{message['role']}>{message['content']}" for message in messages) + "<assistant>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(char) for char in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(token) for token in ids)


@dataclass
class _ModelConfig:
    max_model_len: int
    vocabulary: int = VOCABULARY

    def get_vocab_size(self) -> int:
        return self.vocabulary


class FakeEngine:
    """What the provider uses of vLLM's ``AsyncLLM``."""

    def __init__(self, script: Script | None = None, *, max_model_len: int = 4096) -> None:
        self.script = script or answer("hi")
        self.tokenizer = CharTokenizer()
        self.model_config = _ModelConfig(max_model_len)
        self.errored = False
        self.dead_error: BaseException | None = None
        self.aborted: list[str] = []
        self.shut_down = False

    def get_tokenizer(self) -> CharTokenizer:
        return self.tokenizer

    def get_num_unfinished_requests(self) -> int:
        return 0

    async def generate(self, prompt: Mapping[str, Any], params: Any, request_id: str) -> AsyncIterator[Any]:
        for output in self.script(request_id, params):
            await anyio.lowlevel.checkpoint()
            yield output

    async def abort(self, request_ids: list[str]) -> None:
        self.aborted.extend(request_ids)

    def shutdown(self) -> None:
        self.shut_down = True


class SchedulerStatsSink:
    def as_dict(self) -> dict[str, Any]:
        return {"requests_running": 0, "requests_waiting": 0, "kv_cache_usage": 0.0}


class FakeBackend(types.ModuleType):
    """A module in the place of ``llmrouter_vllm._engine``, building ``engine``."""

    SchedulerStatsSink = SchedulerStatsSink

    def __init__(
        self,
        engine: FakeEngine | None = None,
        *,
        hold_build: bool = False,
        build_error: Exception | None = None,
    ) -> None:
        super().__init__("llmrouter_vllm._engine")
        self.engine = engine or FakeEngine()
        self.hold_build = hold_build
        self.build_error = build_error
        self.building = threading.Event()
        self.release_build = threading.Event()
        self.sampling: list[dict[str, Any]] = []

    def build_engine(self, model: str, named: Any, extra: Any, sink: Any) -> FakeEngine:
        self.building.set()
        if self.hold_build:
            self.release_build.wait(_WAIT_S)
        if self.build_error is not None:
            raise self.build_error
        return self.engine

    def make_sampling_params(self, **kwargs: Any) -> types.SimpleNamespace:
        self.sampling.append(kwargs)
        return types.SimpleNamespace(**kwargs)

    def translate_error(self, exc: BaseException) -> None:
        return None

    def set_env_default(self, name: str, value: str) -> None:
        pass

    def vllm_version(self) -> str:
        return "fake"
