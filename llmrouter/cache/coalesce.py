"""In-flight coalescing: identical requests share one upstream call.

The first request for a key opens a *flight*, one upstream call whose answer (or each
streamed chunk, as it arrives) is published to everyone attending. Requests for the
same key that arrive while it runs attend the same flight instead of calling upstream
again.

Who runs the call, and so what cancelling a client stops, depends on the answer's form:

* **Non-streaming** (:meth:`Coalescer.open`): the first request calls upstream in its
  own task, as it would without a cache: no task, no hand-off, for the usual answer
  that nobody else waits for. If that request leaves before the answer, its call is
  cancelled with it (generation stops) and the next attendee in line calls upstream
  itself, for everyone still waiting. Each call is billed to the request that made it.
* **Streaming** (:meth:`Coalescer.launch`): a producer task of its own, not a child of
  any one client's cancel scope, relays the chunks, so the first client disconnecting
  does not take a stream away from the others. When the *last* attendee leaves before
  the answer is complete, the producer is cancelled and awaited (shielded, bounded),
  so cancellation still stops generation upstream when nobody is listening. Whoever is
  left holding the flight when it ends pays for it: if the client that launched it has
  gone, the next attendee in line becomes the *payer* (see :class:`Flight`), and so on,
  so the call is billed once, to someone who got (all or part of) the answer.

Flights wait on asyncio futures (and streams run as ``asyncio`` tasks); under another
event loop the cache layer does not coalesce.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from llmrouter.chunking import chunks_from_response, response_from_chunks
from llmrouter.errors import UpstreamUnavailableError

if TYPE_CHECKING:
    from llmrouter.context import RequestContext
    from llmrouter.types import ChatChunk, ChatResponse

__all__ = ["Coalescer", "Flight", "FlightCancelledError"]

log = logging.getLogger("llmrouter.cache")


class FlightCancelledError(UpstreamUnavailableError):
    """The shared upstream call was cancelled (shutdown) before it answered."""


class Flight:
    """One upstream call in progress, shared by every identical request.

    Attributes:
        key: the cache key.
        origin: the context of the request whose ``call`` runs upstream; the router
            fills it (deployment, usage, cost).
        payer: the attendee billed for the call: ``origin`` unless it left early, then
            the next in line (the last to leave keeps it: the output produced so far is
            its to pay).
        streaming: True when upstream is streamed (chunks are published live).
        calling: False while a non-streaming flight waits for an attendee to take over
            the call its origin left (see :meth:`result`).
    """

    __slots__ = (
        "_ended_event",
        "_waiters",
        "attendees",
        "calling",
        "chunks",
        "done",
        "ended",
        "error",
        "key",
        "origin",
        "payer",
        "response",
        "reusable",
        "shared",
        "streaming",
        "task",
    )

    def __init__(self, key: str, origin: RequestContext, streaming: bool) -> None:
        self.key = key
        self.origin = origin
        self.payer: RequestContext = origin
        self.streaming = streaming
        self.calling = True
        self.attendees: list[RequestContext] = []
        self.chunks: list[ChatChunk] = []
        self.response: ChatResponse | None = None
        self.error: BaseException | None = None
        self.done = False
        self.ended = False
        """True once the flight is over, storing included (a stream's producer task has ended)."""
        self._ended_event: asyncio.Event | None = None  # made only when someone waits
        self.task: asyncio.Task[None] | None = None
        self.shared = False
        """True once a request other than ``origin`` attended: its payer is then billed the
        output the flight produced, which others may have read further than it did."""
        self.reusable = False
        """Set by the after-flight step when the answer is being stored: until the store
        lands, a new identical request is served from the flight as if it were a hit."""
        # One future per attendee waiting for the next chunk or the outcome, resolved
        # (and dropped) by it: a chunk nobody waits for costs nothing. A waiter that is
        # cancelled cancels only its own future. Flights run on asyncio only.
        self._waiters: list[asyncio.Future[None]] = []

    def push(self, chunk: ChatChunk) -> None:
        """Publish one streamed chunk to every attendee."""
        self.chunks.append(chunk)
        if self._waiters:
            self._signal()

    async def relay(self, upstream: AsyncIterator[ChatChunk]) -> None:
        """Publish every chunk of ``upstream`` as it arrives (:meth:`push`, inlined: this
        runs once per streamed chunk)."""
        chunks = self.chunks
        async for chunk in upstream:
            chunks.append(chunk)
            if self._waiters:
                self._signal()

    def finish(self, *, response: ChatResponse | None = None, error: BaseException | None = None) -> None:
        """Publish the outcome; attendees waiting for the whole answer wake up."""
        if self.done:
            return
        self.response = response
        self.error = error
        self.done = True
        self._signal()

    def _signal(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait_ended(self) -> None:
        """Until the producer task has finished, storing included."""
        if self.ended:
            return
        if self._ended_event is None:
            self._ended_event = asyncio.Event()
        await self._ended_event.wait()

    def mark_ended(self) -> None:
        """The producer task has finished: wake whoever waits in :meth:`wait_ended`."""
        self.ended = True
        if self._ended_event is not None:
            self._ended_event.set()

    async def wait_change(self) -> None:
        """Until the next chunk or the outcome is published."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    async def result(self, taker: RequestContext | None = None) -> ChatResponse | None:
        """The whole answer (assembled from the chunks for a streamed flight).

        Args:
            taker: an attendee that may take over the call when the request calling
                for a non-streaming flight leaves before the answer. It returns None
                when it has: ``taker`` is now the flight's origin and payer, and calls.

        Raises:
            Exception: what the upstream call raised.
        """
        while not self.done:
            if not self.calling and taker is not None:
                self.origin = self.payer = taker
                self.calling = True
                return None
            await self.wait_change()
        if self.error is not None:
            raise self.error
        if self.response is not None:
            return self.response
        return response_from_chunks(self.chunks)

    async def batches(self) -> AsyncGenerator[list[ChatChunk], None]:
        """Every chunk from the first, in lists: those published so far, then each time
        more are, until the outcome (a non-streamed flight is re-chunked once it completes).
        Chunks that arrive together cost one step of the reader, not one each.

        Raises:
            Exception: what the upstream call raised, after the chunks it published.
        """
        chunks = self.chunks
        sent = 0
        while True:
            if sent < len(chunks):
                ready = len(chunks)
                yield chunks[sent:ready]
                sent = ready
            elif self.done:
                break
            else:
                await self.wait_change()
        if self.error is not None:
            raise self.error
        if self.response is not None and not chunks:
            yield chunks_from_response(self.response)


Producer = Callable[[Flight], Awaitable[None]]
"""Streams upstream for a flight, pushing each chunk (:meth:`Flight.relay`)."""
AfterFlight = Callable[[Flight], Awaitable[None]]


class Coalescer:
    """The map of flights in progress, by cache key.

    Args:
        cancel_grace: seconds the last leaving attendee waits for the cancelled
            producer to stop (closing the upstream stream, aborting generation).
    """

    def __init__(self, *, cancel_grace: float = 10.0) -> None:
        self.cancel_grace = cancel_grace
        self._flights: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def find(self, key: str) -> Flight | None:
        """The flight in progress for ``key``, if any (it may be finishing its store)."""
        return self._flights.get(key)

    def open(self, key: str, origin: RequestContext) -> Flight:
        """A non-streaming flight for ``key`` whose ``origin`` calls upstream in its own
        task, then publishes the outcome (:meth:`Flight.finish`) and closes the flight
        (:meth:`close`), or abandons it (:meth:`abandon`) if it leaves first."""
        flight = Flight(key, origin, False)  # positional: a keyword costs a class call ~1k instructions
        self._flights[key] = flight
        return flight

    def close(self, flight: Flight) -> None:
        """A flight :meth:`open` made has published its outcome (and stored it)."""
        self._forget(flight)
        flight.mark_ended()

    def abandon(self, flight: Flight) -> None:
        """The request calling for a flight :meth:`open` made left before the answer:
        the next attendee to wake takes the call over (:meth:`Flight.result`); with
        none attending, the flight is dropped."""
        if flight.attendees and not flight.done:
            flight.calling = False
            flight._signal()
        else:
            self.close(flight)

    def launch(self, key: str, origin: RequestContext, produce: Producer, after: AfterFlight) -> Flight:
        """Start a streaming flight's producer for ``key`` in a task of its own.

        Args:
            produce: calls upstream (see :data:`Producer`).
            after: runs once the answer is published, while the flight still
                takes new attendees (the layer stores the answer here).
        """
        flight = Flight(key, origin, True)
        self._flights[key] = flight
        flight.task = asyncio.create_task(
            self._fly(flight, produce, after), name=f"llmrouter-cache-flight-{key[-12:]}"
        )
        # A done callback, not a finally: a task cancelled before its first step never
        # runs its body, and attendees must still be released.
        flight.task.add_done_callback(lambda _task: self._landed(flight))
        return flight

    def _landed(self, flight: Flight) -> None:
        if not flight.done:  # cancelled before it answered
            flight.finish(error=FlightCancelledError("the shared upstream call was cancelled"))
        self._forget(flight)
        flight.mark_ended()

    async def _fly(self, flight: Flight, produce: Producer, after: AfterFlight) -> None:
        try:
            try:
                await produce(flight)
            except Exception as exc:  # noqa: BLE001 - published to every attendee, who re-raise it
                flight.finish(error=exc)
                return
            flight.finish()
            try:
                await after(flight)
            except Exception:  # a failing store must never fail the answer
                log.exception("cache: after-flight step failed for %s", flight.key)
        finally:
            # Now, not in the done callback: that runs a loop iteration later, and a
            # request arriving in between must not be served this flight's answer.
            self._forget(flight)

    def _forget(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    def attend(self, flight: Flight, ctx: RequestContext) -> _Attendance:
        """Attend ``flight`` for the duration of an ``async with`` block (see the module
        docstring for what leaving early does)."""
        return _Attendance(self, flight, ctx)

    def _leave(self, flight: Flight, ctx: RequestContext) -> bool:
        """Remove ``ctx``; True when that abandoned the flight (its producer is cancelled)."""
        flight.attendees.remove(ctx)
        if flight.done:
            return False
        if flight.task is None:  # opened: its origin calls, and is not an attendee
            if not flight.calling and not flight.attendees:
                self.close(flight)  # the caller left, and now everyone who waited
            return False
        if flight.attendees:
            if flight.payer is ctx:
                flight.payer = flight.attendees[0]
            return False
        self._forget(flight)  # a new identical request must start afresh
        if flight.task is not None:
            flight.task.cancel()
        return True

    async def aclose(self) -> None:
        """End every unanswered flight, let answered ones finish storing, and wait
        (bounded by ``cancel_grace``) for all producers to stop. Attendees of a flight
        that had not answered get :class:`FlightCancelledError`. The call of a flight
        :meth:`open` made is its origin's own request and goes on, as without a cache."""
        flights = list(self._flights.values())
        self._flights.clear()
        for flight in flights:
            if flight.done:
                continue
            if flight.task is not None:
                flight.task.cancel()
            else:
                flight.finish(error=FlightCancelledError("the cache closed before the shared call answered"))
        with anyio.move_on_after(self.cancel_grace):
            for flight in flights:
                if flight.task is not None:
                    await flight.wait_ended()


class _Attendance:
    """One request attending a flight (a class, not a generator-based context manager:
    every cache miss enters one)."""

    __slots__ = ("coalescer", "ctx", "flight")

    def __init__(self, coalescer: Coalescer, flight: Flight, ctx: RequestContext) -> None:
        self.coalescer, self.flight, self.ctx = coalescer, flight, ctx

    async def __aenter__(self) -> Flight:
        flight = self.flight
        if self.ctx is not flight.origin:
            flight.shared = True
        flight.attendees.append(self.ctx)
        return flight

    async def __aexit__(self, *exc_info: object) -> None:
        if self.coalescer._leave(self.flight, self.ctx):
            # Nobody is listening any more: stop generation and wait for the provider to
            # close upstream before this request's teardown goes on.
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.coalescer.cancel_grace):
                await self.flight.wait_ended()
