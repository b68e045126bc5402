"""LiteLLM's proxy as a bench target: the incumbent gateway under the same load, against
the same fake upstream, pinned to the same core as ``llmrouter serve``.

LiteLLM runs from an environment of its own (``scripts/setup-litellm-env`` makes
``.venv-litellm``): its pins (openai, httpx, pydantic, uvicorn) are not ours. The bench
starts its ``litellm`` command with a config written here, one uvicorn worker, its model
cost map read locally (not fetched), its per-request log lines off as ``llmrouter
serve``'s are (``--no-access-log``), and the master key it requires to start.

Each ``llmrouter bench --modes`` mode with a LiteLLM counterpart gets one (:data:`MODES`):
``bare`` is LiteLLM with no cache and no callbacks, ``cache`` adds its in-memory
response cache, ``metrics`` its Prometheus callback, ``full`` both. LiteLLM keeps no
spend ledger without a PostgreSQL database through Prisma, whose engine it downloads
at start, so ``accounting`` has no counterpart and ``full`` lacks that part of ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llmrouter.bench.processes import Child, free_port

__all__ = ["AUTH_HEADERS", "MODES", "litellm_config", "litellm_mode", "start_litellm", "target_name"]

MASTER_KEY = "sk-llmrouter-bench-5f0c1d2e3a4b5c6d7e8f9a0b1c2d3e4f"
"""The key LiteLLM refuses to start without; every request sends it."""

AUTH_HEADERS = {"Authorization": f"Bearer {MASTER_KEY}"}

_CACHE = {"cache": True, "cache_params": {"type": "local"}}
_METRICS = {"callbacks": ["prometheus"]}
MODES: dict[str, dict[str, Any]] = {
    "bare": {},
    "cache": _CACHE,
    "metrics": _METRICS,
    "full": {**_CACHE, **_METRICS},
}
"""``litellm_settings`` for each bench mode LiteLLM has a counterpart of."""

_QUIET_ACCESS_LOG = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"uvicorn.access": {"level": "WARNING"}},
}
"""A ``--log_config`` for uvicorn: no line per request."""

_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the packaged cost map, not a download at start
    "LITELLM_LOG": "ERROR",
}


def target_name(mode: str) -> str:
    """The table's name for LiteLLM in ``mode``."""
    return f"litellm[{mode}]"


def litellm_mode(target: str) -> str | None:
    """The mode of a LiteLLM target's name; None for another target."""
    if target.startswith("litellm[") and target.endswith("]"):
        return target[len("litellm[") : -1]
    return None


def litellm_config(upstream_port: int, mode: str, model: str) -> dict[str, Any]:
    """LiteLLM's proxy config: ``model`` routed to the OpenAI-compatible upstream."""
    if mode not in MODES:
        raise ValueError(f"LiteLLM has no counterpart of bench mode {mode!r} ({', '.join(MODES)})")
    config: dict[str, Any] = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                    "api_key": "unused",
                },
            }
        ],
        "general_settings": {"master_key": MASTER_KEY},
    }
    if MODES[mode]:
        config["litellm_settings"] = MODES[mode]
    return config


def start_litellm(executable: str, upstream_port: int, workdir: Path, mode: str, model: str) -> Child:
    """LiteLLM's proxy in ``mode`` on a free port, once it listens."""
    config = workdir / f"litellm-{mode}.yaml"
    config.write_text(yaml.safe_dump(litellm_config(upstream_port, mode, model)))
    log_config = workdir / "litellm-logging.yaml"
    log_config.write_text(yaml.safe_dump(_QUIET_ACCESS_LOG))
    port = free_port()
    argv = [
        executable,
        "--config", str(config),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--num_workers", "1",
        "--log_config", str(log_config),
    ]  # fmt: skip
    log = workdir / f"litellm-{mode}.log"
    child = Child(argv, port, env=_ENV, log=log)
    try:
        child.wait_listening(timeout=120.0)  # LiteLLM imports for 10-20 s
    except (RuntimeError, TimeoutError) as exc:
        child.stop()
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"LiteLLM ({executable}) did not start in mode {mode}: {exc}\n{tail}") from None
    except BaseException:
        child.stop()
        raise
    return child
