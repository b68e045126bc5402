"""What the provider tells the operator while it converts and loads a model.

Under ``llmrouter serve`` logging is set up before the models load (JSON lines by
default), so the notices go through it, and transformers' progress bars, which would
put lines that are not JSON into that log, are turned off. Elsewhere (a script, a
notebook) nothing may have set logging up: the notices are plain lines on stderr, and
the bars stay.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["notice", "quiet_progress_bars"]

log = logging.getLogger("llmrouter.transformers")


def _logging_set_up() -> bool:
    return bool(logging.getLogger().handlers)


def notice(message: str) -> None:
    if _logging_set_up():
        log.info(message)
    else:
        print(f"llmrouter-transformers: {message}", file=sys.stderr, flush=True)


def quiet_progress_bars() -> None:
    """Turn transformers' progress bars off when the process logs through ``logging``."""
    if _logging_set_up():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
