"""What the provider tells the operator while it converts and loads a model.

Under ``llmrouter serve`` logging is set up before the models load (JSON lines by
default), so the notices go through it, and so do transformers' own warnings (its
plain-text handler is taken off); its progress bars, which would put lines that are not
JSON into that log, are turned off. Elsewhere (a script, a notebook) nothing may have set
logging up: the notices are plain lines on stderr, and transformers is left as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

__all__ = ["notice", "quiet_progress_bars", "stray_bars_dropped"]

log = logging.getLogger("llmrouter.transformers")


def _logging_set_up() -> bool:
    return bool(logging.getLogger().handlers)


def notice(message: str) -> None:
    if _logging_set_up():
        log.info(message)
    else:
        print(f"llmrouter-transformers: {message}", file=sys.stderr, flush=True)


def quiet_progress_bars() -> None:
    """When the process logs through ``logging``: transformers' progress bars off, and its
    warnings through that logging rather than its own handler's plain lines."""
    if _logging_set_up():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()


@contextlib.contextmanager
def stray_bars_dropped() -> Iterator[None]:
    """When the process logs through ``logging``, drop what is written to ``sys.stderr``
    meanwhile: the GGUF conversion draws its bar with ``tqdm`` directly, which the switch
    :func:`quiet_progress_bars` turns does not reach. The log's own handler keeps the
    stream it was made with, so records still go out."""
    if not _logging_set_up():
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stderr(sink):
        yield
