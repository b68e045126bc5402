"""asyncio fast paths, with anyio's portable versions for other event loops (trio).

anyio's primitives look up the running backend and wrap themselves in generator
context managers on every use; on the gateway's hot path, where everything runs on
asyncio, the native ones cost about half as much.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import anyio

__all__ = ["on_asyncio", "time_limit", "to_completion", "within"]

T = TypeVar("T")


def on_asyncio() -> bool:
    """Whether the caller runs on an asyncio event loop (not trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def time_limit(seconds: float | None) -> AbstractAsyncContextManager[Any]:
    """``async with time_limit(s):`` raises ``TimeoutError`` after ``s`` seconds (None: never).

    ``asyncio.timeout`` on asyncio, anyio's ``fail_after`` elsewhere.
    """
    return asyncio.timeout(seconds) if on_asyncio() else _anyio_deadline(seconds)


@asynccontextmanager
async def _anyio_deadline(seconds: float | None) -> AsyncIterator[None]:
    with anyio.fail_after(seconds):
        yield


async def to_completion(work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` to its end even if the caller is cancelled meanwhile; a cancellation
    then goes on once ``work`` has finished.

    For settlement that must not be cut short: after-request hooks (the ledger row,
    releasing a rate-limit slot, settling a budget), counting the usage of an answer
    that exists. anyio's shielded cancel scope holds off only anyio's own cancellation;
    on asyncio a plain ``Task.cancel()`` (``asyncio.timeout``, ``wait_for``, the
    service's disconnect watch) goes straight through it. Here ``work`` runs as a task
    of its own, which the caller's cancellation does not reach, and the caller waits for
    it either way. Other event loops (trio) get anyio's shield.
    """
    if not on_asyncio():
        with anyio.CancelScope(shield=True):
            return await work
    task = asyncio.get_running_loop().create_task(work)
    try:
        await _finished(task)
    except asyncio.CancelledError:
        # anyio delivers its cancellation again and again until the scope is left: a
        # shield keeps it off while waiting; a native cancel comes once per call.
        with anyio.CancelScope(shield=True):
            while not task.done():
                try:
                    await _finished(task)
                except asyncio.CancelledError:
                    continue
        if not task.cancelled():
            task.exception()  # the caller's cancellation wins; mark the error as seen
        raise
    return task.result()


_abandoned: set[asyncio.Task[Any]] = set()  # cancelled by within(), still cleaning up


async def within(seconds: float | None, work: Coroutine[Any, Any, T]) -> T:
    """``await work``, or ``TimeoutError`` after ``seconds`` (None: no bound), even when
    ``work`` is slow to stop: a cancelled database call closes its connection, which
    against a server that stopped answering took 2 s more than the bound. Past the
    bound ``work`` is cancelled and left to finish that in the background; the caller
    is free at once. (Other event loops than asyncio wait for it, under anyio's
    deadline.) Cancelling the caller cancels ``work`` too.
    """
    if seconds is None:
        return await work
    if not on_asyncio():
        with anyio.fail_after(seconds):
            return await work
    task = asyncio.get_running_loop().create_task(work)
    try:
        async with asyncio.timeout(seconds):
            await _finished(task)
    except TimeoutError:
        if task.done():  # it finished as the time ran out
            return task.result()
        _abandon(task)
        raise
    except BaseException:
        _abandon(task)
        raise
    return task.result()


def _abandon(task: asyncio.Task[Any]) -> None:
    if task.done():
        _forget(task)
        return
    task.cancel()
    _abandoned.add(task)
    task.add_done_callback(_forget)


def _forget(task: asyncio.Task[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # the caller has gone: mark a late error as seen


def _finished(task: asyncio.Task[Any]) -> asyncio.Future[None]:
    """A future done when ``task`` is; cancelling it leaves ``task`` alone (unlike
    awaiting the task itself, which would cancel it)."""
    waiter: asyncio.Future[None] = task.get_loop().create_future()

    def wake(_task: asyncio.Task[Any]) -> None:
        if not waiter.done():
            waiter.set_result(None)

    task.add_done_callback(wake)
    return waiter
