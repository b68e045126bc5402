"""Continuous batching in one worker thread.

All model work happens in a single thread that owns the model, so requests never
contend for it through a lock. Each turn of the loop:

1. drops cancelled rows (so a cancelled request leaves within one decoding step);
2. if requests arrived since the last step, prefills them as one left-padded group
   and joins them to the running batch (their first token comes from the prefill);
3. otherwise runs one decoding step for every row and hands each new token to its
   request.

Prefills come first, as in vLLM's original scheduler: a request's first token does
not wait for a decoding step of the rows already running. Those rows wait at most
``max_batch_size`` prefills in a row, so a stream of arrivals cannot starve them.

Requests talk to the thread through :class:`GenerationJob`: ``on_event`` is called
from the worker thread (it must not block), ``notify`` once after each turn that gave
the job events (to wake its consumer once per turn rather than once per event), and
``cancel()`` may be called from any thread.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmrouter.errors import UpstreamError
from llmrouter_transformers.batch import BatchState, cache_supports_batching, prefill_inputs
from llmrouter_transformers.sampling import SamplingParams, TokenSampler, choose_next_tokens
from llmrouter_transformers.text import IncrementalDecoder, StopStringFilter

__all__ = ["GenerationEngine", "GenerationJob", "JobEvent"]

_ids = itertools.count(1)


@dataclass(slots=True, frozen=True)
class JobEvent:
    """Text produced by one step for one request; the last event has ``finish_reason``."""

    text: str = ""
    finish_reason: str | None = None
    """``stop``, ``length`` or ``cancelled``; None while generating."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None


class GenerationJob:
    """One request's life inside the engine.

    Args:
        prompt_ids: the prompt's token ids.
        params: sampling settings and limits.
        on_event: called from the worker thread with each :class:`JobEvent`; must not block.
        notify: if given, called from the worker thread after each turn of the engine
            that called ``on_event`` (once per turn for all jobs sharing it); must not block.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_event: Callable[[JobEvent], None],
        notify: Callable[[], None] | None = None,
    ) -> None:
        self.id = next(_ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.on_event = on_event
        self.notify = notify
        self.generated: list[int] = []
        self.forward_steps = 0
        """Forward passes that computed a token for this job (prefill included)."""
        self.steps_at_cancel: int | None = None
        self.finish_reason: str | None = None
        self.done = threading.Event()
        self._cancelled = False
        # Per-request state owned by the worker thread.
        self.sampler: TokenSampler | None = None
        self.decoder: IncrementalDecoder | None = None
        self.stops = StopStringFilter(params.stop)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Ask the engine to drop this job before its next step (idempotent, thread-safe)."""
        if not self._cancelled and not self.done.is_set():
            self.steps_at_cancel = self.forward_steps
        self._cancelled = True


class GenerationEngine:
    """Owns a model and decodes every admitted request together, in one thread.

    Args:
        model: a loaded ``PreTrainedModel`` (causal LM), already on ``device``.
        tokenizer: its tokenizer.
        device: the torch device of the model.
        eos_token_ids: token ids that end a sequence with ``finish_reason="stop"``.
        max_batch_size: most rows decoded at once; later requests wait their turn.
        max_context: longest sequence (prompt + generated) a row may reach.
        torch_threads: intra-op threads for this engine's thread (OpenMP settings are per thread).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: Any,
        eos_token_ids: set[int],
        max_batch_size: int = 8,
        max_context: int | None = None,
        torch_threads: int | None = None,
    ) -> None:
        self.model = model
        self.torch_threads = torch_threads
        self.tokenizer = tokenizer
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.max_batch_size = max(1, max_batch_size)
        self.max_context = max_context
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.vocabulary: int = model.get_input_embeddings().num_embeddings
        """The token ids the model embeds are 0 to ``vocabulary - 1``: any other id in a
        prompt fails the forward pass (and every row batched with it)."""
        self.steps = 0
        """Forward passes run so far (prefills and decoding steps)."""
        self.peak_batch = 0
        """The most rows one decoding step has carried (shows that requests were batched)."""
        self.finished: collections.deque[GenerationJob] = collections.deque(maxlen=64)
        """The most recent jobs that left the engine (for health checks and tests)."""
        forward_parameters = inspect.signature(model.forward).parameters
        self._accepts_logits_to_keep = "logits_to_keep" in forward_parameters
        # transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40).
        self._cache_argument = "cache" if "cache" in forward_parameters else "past_key_values"
        from transformers import DynamicCache

        # Sliding-window or other special caches cannot be padded and sliced: one row at a time.
        self.batching = cache_supports_batching(DynamicCache(config=model.config))
        self._pending: collections.deque[GenerationJob] = collections.deque()
        self._rows: list[GenerationJob] = []
        self._prefills_since_decode = 0
        self._to_notify: set[Callable[[], None]] = set()
        self._next_tokens: list[int] = []
        self._batch = BatchState()
        self._wakeup = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # --- any thread -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmrouter-transformers-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def active(self) -> int:
        """Rows being decoded now."""
        return len(self._rows)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, job: GenerationJob) -> None:
        """Queue ``job``; it joins the batch before the next step."""
        with self._wakeup:
            if self._closing:
                raise UpstreamError("the transformers engine is shut down", provider="transformers")
            self._pending.append(job)
            self._wakeup.notify()

    def cancel(self, job: GenerationJob) -> None:
        job.cancel()
        with self._wakeup:
            self._wakeup.notify()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the worker after its current step and fail what is still queued."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # --- worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        import torch

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not self._closing and not self._pending and not self._rows:
                        self._wakeup.wait()
                    if self._closing:
                        break
                    newcomers = self._admit()
                try:
                    self._step(newcomers)
                except Exception as exc:  # noqa: BLE001 - every waiting request must hear about it
                    self._fail_all(newcomers, exc)
                self._notify()
        self._fail_all(
            list(self._pending), UpstreamError("the transformers engine shut down", provider="transformers")
        )
        self._notify()

    def _admit(self) -> list[GenerationJob]:
        if self._rows and self._prefills_since_decode >= self.max_batch_size:
            return []  # the running rows' turn
        room = self.max_batch_size - len(self._rows) if self.batching else int(not self._rows)
        newcomers: list[GenerationJob] = []
        while self._pending and len(newcomers) < room:
            job = self._pending.popleft()
            if job.cancelled:
                self._finish(job, "cancelled")
            else:
                newcomers.append(job)
        return newcomers

    def _step(self, newcomers: list[GenerationJob]) -> None:
        self._drop_cancelled()
        if newcomers:
            self._prefill(newcomers)
            self._prefills_since_decode += 1
        elif self._rows:
            self._decode()
            self._prefills_since_decode = 0
        self._drop_finished()

    def _prefill(self, jobs: list[GenerationJob]) -> None:
        from transformers import DynamicCache

        inputs = prefill_inputs([job.prompt_ids for job in jobs], self.pad_token_id, self.device)
        cache = DynamicCache(config=self.model.config)
        if self._accepts_logits_to_keep:
            inputs["logits_to_keep"] = 1
        inputs[self._cache_argument] = cache
        logits = self.model(**inputs).logits[:, -1, :]
        self.steps += 1
        for job in jobs:
            job.sampler = TokenSampler(job.params, self.device)
            job.decoder = IncrementalDecoder(self.tokenizer)
        tokens = choose_next_tokens(logits, [job.sampler for job in jobs])  # type: ignore[misc]
        positions = [len(job.prompt_ids) for job in jobs]
        self._batch.join(cache, inputs["attention_mask"], positions)
        self._rows.extend(jobs)
        self._next_tokens.extend(tokens)
        for job, token in zip(jobs, tokens, strict=True):
            self._accept(job, token)

    def _decode(self) -> None:
        self.peak_batch = max(self.peak_batch, len(self._rows))
        inputs = self._batch.decode_inputs(self._next_tokens)
        inputs[self._cache_argument] = self._batch.cache
        logits = self.model(**inputs).logits[:, -1, :]
        self.steps += 1
        tokens = choose_next_tokens(logits, [job.sampler for job in self._rows])  # type: ignore[misc]
        self._next_tokens = tokens
        for job, token in zip(self._rows, tokens, strict=True):
            self._accept(job, token)

    def _accept(self, job: GenerationJob, token: int) -> None:
        """Hand one new token to its job and decide whether the job is finished."""
        job.forward_steps += 1
        if job.cancelled:
            return  # computed in the step that was running when the cancel came; not sent
        job.generated.append(token)
        if token in self.eos_token_ids:
            self._finish(job, "stop")
            return
        assert job.decoder is not None
        text = job.stops.feed(job.decoder.push(token))
        if job.stops.stopped:
            self._emit(job, text)
            self._finish(job, "stop")
            return
        if text:
            self._emit(job, text)
        total = len(job.prompt_ids) + len(job.generated)
        if len(job.generated) >= job.params.max_new_tokens or (
            self.max_context and total >= self.max_context
        ):
            self._finish(job, "length")

    def _emit(self, job: GenerationJob, text: str) -> None:
        if text:
            self._tell(job, JobEvent(text=text))

    def _finish(self, job: GenerationJob, reason: str, error: BaseException | None = None) -> None:
        if job.done.is_set():
            return
        tail = ""
        if error is None and reason != "cancelled" and job.decoder is not None:
            tail = job.stops.feed(job.decoder.flush()) + job.stops.flush()
        job.finish_reason = reason
        # Record the job before telling its consumer, which may look it up at once.
        self.finished.append(job)
        job.done.set()
        self._tell(
            job,
            JobEvent(
                text=tail,
                finish_reason=reason,
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=len(job.generated),
                error=error,
            ),
        )

    def _tell(self, job: GenerationJob, event: JobEvent) -> None:
        job.on_event(event)
        if job.notify is not None:
            self._to_notify.add(job.notify)

    def _notify(self) -> None:
        """Wake, once each, the consumers whose jobs got events in this turn."""
        while self._to_notify:
            self._to_notify.pop()()

    def _drop_cancelled(self) -> None:
        for job in self._rows:
            if job.cancelled:
                self._finish(job, "cancelled")
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = [row for row, job in enumerate(self._rows) if not job.done.is_set()]
        if len(keep) == len(self._rows):
            return
        self._batch.keep(keep)
        self._rows = [self._rows[row] for row in keep]
        self._next_tokens = [self._next_tokens[row] for row in keep]

    def _fail_all(self, newcomers: list[GenerationJob], exc: BaseException) -> None:
        error = (
            exc
            if isinstance(exc, UpstreamError)
            else UpstreamError(f"generation failed: {type(exc).__name__}: {exc}", provider="transformers")
        )
        if error is not exc:
            error.__cause__ = exc
        for job in [*self._rows, *newcomers]:
            self._finish(job, "error", error)
        self._rows, self._next_tokens = [], []
        self._batch.clear()
        if self._closing:
            with self._wakeup:
                pending, self._pending = list(self._pending), collections.deque()
            for job in pending:
                self._finish(job, "error", error)
