"""Everything that touches vLLM itself; imported only when a provider starts.

Keeping the vLLM imports here (and out of :mod:`llmrouter_vllm.provider`) keeps
``import llmrouter_vllm`` light: vLLM takes 10+ seconds to import and pulls torch.

vLLM's CPU platform forces the ``spawn`` start method, so the engine's worker
processes re-import this module's parents; nothing here runs at import time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from vllm import AsyncEngineArgs, SamplingParams
from vllm.exceptions import GracefulHTTPError, VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
from vllm.v1.metrics.loggers import StatLoggerBase

from llmrouter.errors import (
    ConfigError,
    InvalidRequestError,
    LLMRouterError,
    UpstreamError,
    UpstreamUnavailableError,
    error_for_status,
)
from llmrouter.provider import check_token_ids

__all__ = [
    "AsyncLLM",
    "RequestOutputKind",
    "SamplingParams",
    "SchedulerStatsSink",
    "build_engine",
    "engine_arg_names",
    "make_sampling_params",
    "translate_error",
    "vllm_version",
]

PROVIDER = "vllm"


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def engine_arg_names() -> frozenset[str]:
    return frozenset(field.name for field in dataclasses.fields(AsyncEngineArgs))


class SchedulerStatsSink:
    """Latest scheduler numbers (queue depth, KV-cache use) reported by the engine core."""

    def __init__(self) -> None:
        self.num_running_reqs = 0
        self.num_waiting_reqs = 0
        self.kv_cache_usage = 0.0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.updates = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests_running": self.num_running_reqs,
            "requests_waiting": self.num_waiting_reqs,
            "kv_cache_usage": self.kv_cache_usage,
            "prefix_cache_queries": self.prefix_cache_queries,
            "prefix_cache_hits": self.prefix_cache_hits,
        }

    def logger_factory(self) -> Any:
        """A vLLM per-engine stat-logger factory that writes into this sink."""
        sink = self

        class _SinkLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.engine_index = engine_index

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                if scheduler_stats is None:
                    return
                sink.num_running_reqs = scheduler_stats.num_running_reqs
                sink.num_waiting_reqs = scheduler_stats.num_waiting_reqs
                sink.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
                prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
                if prefix is not None:
                    sink.prefix_cache_queries += int(getattr(prefix, "queries", 0))
                    sink.prefix_cache_hits += int(getattr(prefix, "hits", 0))
                sink.updates += 1

            def log_engine_initialized(self) -> None:
                pass

        return _SinkLogger


def build_engine(
    model: str,
    named_args: Mapping[str, Any],
    extra_args: Mapping[str, Any],
    sink: SchedulerStatsSink,
) -> AsyncLLM:
    """Create the AsyncLLM (blocking, tens of seconds: call it off the event loop).

    Args:
        model: model directory or hub id.
        named_args: the provider's named options, already mapped to engine-arg names.
        extra_args: the free-form ``engine_args`` map; wins over ``named_args``.
        sink: receives the engine's scheduler stats.

    Raises:
        ConfigError: an unknown engine argument or a configuration vLLM rejects.
    """
    known = engine_arg_names()
    unknown = sorted(set(extra_args) - known)
    if unknown:
        raise ConfigError(f"vllm: unknown engine_args {unknown} (see vllm.AsyncEngineArgs)")
    kwargs: dict[str, Any] = {"model": model, **named_args, **extra_args}
    # Stats reach us through the sink's logger; vLLM's own periodic log line stays off.
    kwargs.setdefault("disable_log_stats", True)
    try:
        args = AsyncEngineArgs(**kwargs)
        return AsyncLLM.from_engine_args(args, stat_loggers=[sink.logger_factory()])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"vllm: cannot start engine for {model!r}: {exc}") from exc


# Request fields vLLM's own OpenAI server accepts beside the OpenAI ones ("extra body").
# Its structured-output fields (`structured_outputs`, `guided_*`) are not among them:
# the provider maps or refuses those (`_wire.structured_outputs`) before this module.
_EXTRA_SAMPLING_KEYS = frozenset(
    {
        "top_k",
        "min_p",
        "repetition_penalty",
        "min_tokens",
        "ignore_eos",
        "stop_token_ids",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "include_stop_str_in_output",
        "bad_words",
        "allowed_token_ids",
    }
)


_SMALLEST_TOP_P = 1e-9
"""What ``top_p: 0`` becomes: a nucleus that holds the likeliest token alone."""


def make_sampling_params(
    *,
    max_tokens: int,
    n: int | None,
    temperature: float | None,
    top_p: float | None,
    stop: list[str],
    seed: int | None,
    presence_penalty: float | None,
    frequency_penalty: float | None,
    logit_bias: Mapping[str, float] | None,
    vocabulary: int,
    logprobs: int | None,
    structured_outputs: Mapping[str, Any] | None,
    extra: Mapping[str, Any],
    stream: bool,
) -> SamplingParams:
    """Map OpenAI sampling fields onto vLLM's SamplingParams (unset fields keep vLLM's defaults).

    Args:
        structured_outputs: ``StructuredOutputsParams`` keywords, from
            :func:`llmrouter_vllm._wire.structured_outputs`; None leaves the output free.

    Raises:
        InvalidRequestError: a value vLLM rejects, or a logit_bias key that is not one of
            the model's ``vocabulary`` token ids.
    """
    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens,
        "n": n or 1,
        "stop": stop or None,
        "seed": seed,
        "output_kind": RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    }
    optional = {
        "temperature": temperature,
        # OpenAI takes top_p 0 (only the likeliest token); vLLM refuses anything not over
        # 0, and keeps the likeliest token of any nucleus, however small.
        "top_p": _SMALLEST_TOP_P if top_p == 0 else top_p,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        "logprobs": logprobs,
    }
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    if logit_bias:
        try:
            kwargs["logit_bias"] = {int(token): float(bias) for token, bias in logit_bias.items()}
        except ValueError as exc:
            raise InvalidRequestError(
                "logit_bias keys must be token ids", param="logit_bias", provider=PROVIDER
            ) from exc
        check_token_ids(kwargs["logit_bias"], vocabulary, param="logit_bias", provider=PROVIDER)
    kwargs.update({key: value for key, value in extra.items() if key in _EXTRA_SAMPLING_KEYS})
    try:
        if structured_outputs is not None:
            # A client's `structured_outputs` object may hold keys or values vLLM refuses.
            kwargs["structured_outputs"] = StructuredOutputsParams(**structured_outputs)
        return SamplingParams(**kwargs)
    except (TypeError, ValueError, VLLMClientError) as exc:
        raise InvalidRequestError(str(exc), provider=PROVIDER) from exc


def translate_error(exc: BaseException) -> LLMRouterError | None:
    """The llmrouter error for a vLLM exception, or None when it is not vLLM's."""
    if isinstance(exc, EngineDeadError):
        return UpstreamUnavailableError(f"vllm engine is dead: {exc}", provider=PROVIDER)
    if isinstance(exc, GracefulHTTPError):
        # Admission control (queue full) and the like carry their own HTTP status.
        return error_for_status(int(exc.http_status), exc.message, provider=PROVIDER)
    if isinstance(exc, VLLMClientError | ValueError):
        return InvalidRequestError(str(exc), provider=PROVIDER)
    if isinstance(exc, EngineGenerateError):
        cause = exc.__cause__
        detail = f"{type(cause).__name__}: {cause}" if cause else "generation failed"
        return UpstreamError(f"vllm generation failed: {detail}", provider=PROVIDER)
    return None


def set_env_default(name: str, value: str) -> None:
    """Set a process-wide vLLM environment variable unless the operator already did."""
    os.environ.setdefault(name, value)
