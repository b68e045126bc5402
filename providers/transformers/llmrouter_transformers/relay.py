"""Handing the engine thread's events to an event loop, a batch per wakeup.

Waking an event loop from another thread (``call_soon_threadsafe``) writes to the
loop's self-pipe and hands the GIL over, and the loop then runs before the engine
thread gets the GIL back: ~25 µs, paid for every row of every decoding step when
each event wakes the loop. An :class:`EventRelay` queues the events of all its jobs
and wakes its loop once per turn of the engine (the jobs' ``notify``), so a step of
eight rows costs one wakeup instead of eight.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel

from llmrouter_transformers.engine import JobEvent

__all__ = ["EventRelay"]


class EventRelay:
    """Delivers events posted from the engine thread to memory streams of one event loop.

    Create it on the loop's thread. A job gets ``on_event=relay.sender(send)`` and
    ``notify=relay.wake``: events queue up until the engine calls ``wake`` at the end
    of its turn.
    """

    def __init__(self) -> None:
        native: Any = anyio.lowlevel.current_token().native_token  # asyncio loop or trio token
        self.native = native
        self._wake_loop = getattr(native, "call_soon_threadsafe", None) or native.run_sync_soon
        self._queued: collections.deque[tuple[Any, JobEvent]] = collections.deque()
        self._waking = False

    def sender(self, send: Any) -> Callable[[JobEvent], None]:
        """The callback that queues events for ``send`` (a memory object send stream)."""
        return partial(self._post, send)

    def _post(self, send: Any, event: JobEvent) -> None:
        self._queued.append((send, event))

    def wake(self) -> None:
        """Have the loop deliver what is queued (from any thread; a no-op while a wakeup is pending)."""
        if self._waking or not self._queued:
            return  # the wakeup already asked for delivers these events too
        self._waking = True
        try:
            self._wake_loop(self._deliver)
        except RuntimeError:
            pass  # the event loop has closed

    def _deliver(self) -> None:
        # Cleared before draining: an event queued after this line is either drained
        # below or followed by a wake() that sees the flag down and asks again.
        self._waking = False
        queued = self._queued
        while queued:
            send, event = queued.popleft()
            try:
                send.send_nowait(event)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the consumer has gone; the job is being cancelled
