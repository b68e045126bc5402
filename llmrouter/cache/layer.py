"""The response cache: lookup, in-flight coalescing and store around dispatch.

:class:`ResponseCache` implements :class:`~llmrouter.hooks.CacheLayer`. For each
request the router hands it the context, the request and ``call`` (the real
dispatch); the cache decides whether ``call`` runs at all::

    not cacheable (sampling, group off) ──────────────► call()              bypass
    Cache-Control: no-cache ──────────────────────────► call(), store       bypass
    identical request in flight ──────────────────────► wait for it         coalesced
    stored answer ────────────────────────────────────► replay it           hit (cost 0)
    otherwise ─────────────► open a flight: call(), publish, store          miss

A non-streaming miss calls in the request's own task and stores the answer before
returning it (as without coalescing); a streaming miss relays from a producer task (see
:mod:`llmrouter.cache.coalesce` for what either does when its client leaves).

A request is cacheable when it is deterministic (``temperature: 0`` or a ``seed``)
or its model group opts in with ``cache.cache_all``. Errors, cancelled and
incomplete answers are never stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec

from llmrouter.aio import on_asyncio, to_completion
from llmrouter.cache.base import CacheBackend
from llmrouter.cache.breaker import Breaker, is_entry_error
from llmrouter.cache.coalesce import Coalescer, Flight
from llmrouter.cache.entry import CacheEntry, decode_entry, encode_entry, is_storable, last_usage
from llmrouter.cache.key import cache_key
from llmrouter.counting import estimated_usage
from llmrouter.types import Usage

if TYPE_CHECKING:
    from llmrouter.cache.config import CacheConfig
    from llmrouter.config import Config, GroupCache
    from llmrouter.context import CacheStatus, RequestContext
    from llmrouter.types import ChatChunk, ChatRequest, ChatResponse

__all__ = ["CacheStats", "ResponseCache", "build_backend"]

log = logging.getLogger("llmrouter.cache")


@dataclass(slots=True)
class CacheStats:
    """Counters since start; telemetry exports them (see docs/cache.md)."""

    hits: int = 0
    misses: int = 0
    bypasses: int = 0
    coalesced: int = 0
    stores: int = 0
    """Answers written to the backend."""
    skipped: int = 0
    """Answers not written: incomplete, failed, too large, or ``no-store``."""
    errors: int = 0
    """Backend failures (a failed lookup counts as a miss, a failed store as skipped)."""


class _Plan(msgspec.Struct, frozen=True, gc=False):
    """Where a cacheable request's answer is stored, and for how long. (A Struct made
    positionally: ~0.7k CPU instructions. A frozen dataclass's ``__init__`` sets each field
    through ``object.__setattr__``; a NamedTuple's ``__new__`` is Python, 3k. Untracked by
    the garbage collector: it holds strings and a number.)"""

    key: str
    ttl: float | None
    group: str
    """The model group the request named (resolved): the one every entry may come from."""
    flight_key: str
    """The key of its flight: ``key``, and the caller's fallbacks when it has some (see
    :meth:`ResponseCache._plan`)."""


class ResponseCache:
    """Exact-match response cache with in-flight coalescing.

    Args:
        backend: where entries live (memory, SQLite, Redis, or your own).
        ttl: default seconds an entry lives (None: until evicted).
        groups: per model group settings (``ModelGroup.cache``), by group name or alias.
        namespace_by_key: keep each API key's answers apart.
        coalesce: share one upstream call between identical concurrent requests.
        store_truncated: also store answers with ``finish_reason: length``.
        max_entry_bytes: don't store encoded answers larger than this.
    """

    def __init__(
        self,
        backend: CacheBackend,
        *,
        ttl: float | None = 3600.0,
        groups: Mapping[str, GroupCache | None] | None = None,
        namespace_by_key: bool = False,
        coalesce: bool = True,
        store_truncated: bool = False,
        max_entry_bytes: int | None = None,
    ) -> None:
        self.backend = backend
        self.ttl = ttl
        self.namespace_by_key = namespace_by_key
        self.coalesce = coalesce
        self.store_truncated = store_truncated
        self.max_entry_bytes = max_entry_bytes
        self.stats = CacheStats()
        self.coalescer = Coalescer()
        self.breaker = Breaker()
        """Skips a failing backend for a while (see :mod:`llmrouter.cache.breaker`)."""
        self._groups: dict[str, GroupCache | None] = dict(groups or {})

    @classmethod
    def from_config(cls, config: Config) -> ResponseCache | None:
        """The cache that ``config.cache`` describes, or None for ``backend: none``."""
        settings = config.cache
        backend = build_backend(settings)
        if backend is None:
            return None
        groups: dict[str, GroupCache | None] = {}
        for group in config.models:
            for name in (group.name, *group.aliases):
                groups[name] = group.cache
        return cls(
            backend,
            ttl=settings.ttl,
            groups=groups,
            namespace_by_key=settings.namespace_by_key,
            coalesce=settings.coalesce,
            store_truncated=settings.store_truncated,
            max_entry_bytes=settings.max_entry_bytes,
        )

    def configure_group(self, name: str, settings: GroupCache | None) -> None:
        """Set (or with None, reset) one model group's cache settings."""
        self._groups[name] = settings

    async def start(self) -> None:
        await self.backend.start()

    async def aclose(self) -> None:
        """Cancel flights in progress and close the backend."""
        await self.coalescer.aclose()
        await self.backend.aclose()

    async def clear(self) -> int:
        """Drop every stored entry; returns how many (when the backend can tell)."""
        return await self.backend.clear()

    def snapshot(self) -> dict[str, Any]:
        """Counters and backend figures, for ``/ready``, the admin route and metrics."""
        backend = self.backend.stats()
        looked_up = self.stats.hits + self.stats.misses + self.stats.coalesced
        return {
            "backend": self.backend.name,
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "bypasses": self.stats.bypasses,
            "coalesced": self.stats.coalesced,
            "stores": self.stats.stores,
            "skipped": self.stats.skipped,
            "errors": self.stats.errors,
            "hit_ratio": round((self.stats.hits + self.stats.coalesced) / looked_up, 4) if looked_up else 0.0,
            "entries": backend.entries,
            "bytes": backend.bytes,
            "evictions": backend.evictions,
            "expirations": backend.expirations,
            "in_flight": len(self.coalescer),
        }

    # --- the CacheLayer protocol ------------------------------------------------------

    async def chat(
        self, ctx: RequestContext, request: ChatRequest, call: Callable[[], Awaitable[ChatResponse]]
    ) -> ChatResponse:
        """Answer from the cache, from an identical request in flight, or through ``call``."""
        plan = self._plan(ctx, request)
        if plan is None or ctx.no_cache or ctx.max_age == 0:  # max-age=0: as no-cache
            self._mark(ctx, "bypass")
            response = await call()
            if plan is not None and not ctx.no_store:
                await self._store(plan, ctx, response=response)
            return response
        coalescing = self._can_coalesce()
        found = await self._find_or_lookup(ctx, plan, coalescing, streaming=False)
        if found is None:
            self._mark(ctx, "miss")
            if not coalescing:
                response = await call()
                if not ctx.no_store:
                    await self._store(plan, ctx, response=response)
                return response
            flight = self.coalescer.open(plan.flight_key, ctx)
        elif isinstance(found, CacheEntry):
            ctx.first_token_at = time.perf_counter()
            return found.as_response()
        else:
            flight = found
            try:
                async with self.coalescer.attend(flight, ctx):
                    answer = await flight.result(taker=ctx)
            except BaseException:
                await self._settle_leaver(ctx, flight)
                raise
            if answer is not None:
                ctx.first_token_at = time.perf_counter()
                self._settle(ctx, flight, answer)
                return answer
            # The request calling for this flight left before the answer: this one calls.
            self._take_over(ctx)
        # This request calls upstream for the flight, in its own task, publishes the answer
        # to the flight's attendees and stores it.
        try:
            response = await call()
        except Exception as exc:
            flight.finish(error=exc)  # every attendee re-raises it
            self.coalescer.close(flight)
            raise
        except BaseException:
            self.coalescer.abandon(flight)  # cancelled: an attendee calls again
            raise
        flight.finish(response=response)
        try:
            await self._store_flight(plan, flight, store=not flight.origin.no_store)
        except Exception:  # a failing store must never fail the answer
            log.exception("cache: storing the answer failed for %s", flight.key)
        finally:
            self.coalescer.close(flight)
        return response

    def stream(
        self, ctx: RequestContext, request: ChatRequest, call: Callable[[], AsyncIterator[ChatChunk]]
    ) -> AsyncIterator[ChatChunk]:
        """Stream from the cache (replayed chunks), from an identical request in flight
        (the same chunks as they arrive), or through ``call``.

        Decided here, before the first chunk is asked for: a request that is not
        cacheable gets ``call()``'s own iterator, with no generator of the cache's
        around it (each layer costs every chunk ~2k CPU instructions)."""
        plan = self._plan(ctx, request)
        if plan is None or ctx.no_cache or ctx.max_age == 0:  # max-age=0: as no-cache
            self._mark(ctx, "bypass")
            return call() if plan is None else self._upstream(ctx, plan, call)
        return self._stream_cacheable(ctx, plan, call)

    async def _stream_cacheable(
        self, ctx: RequestContext, plan: _Plan, call: Callable[[], AsyncIterator[ChatChunk]]
    ) -> AsyncGenerator[ChatChunk, None]:
        coalescing = self._can_coalesce()
        flight = await self._find_or_lookup(ctx, plan, coalescing, streaming=True)
        if isinstance(flight, CacheEntry):
            ctx.first_token_at = time.perf_counter()
            for chunk in flight.as_chunks():
                yield chunk
            return
        if flight is None:
            self._mark(ctx, "miss")
            if not coalescing:
                async with aclosing(self._upstream(ctx, plan, call)) as chunks:  # type: ignore[type-var]
                    async for chunk in chunks:
                        yield chunk
                return
            flight = self.coalescer.launch(
                plan.flight_key,
                ctx,
                _stream_producer(call),
                partial(self._store_flight, plan, store=not ctx.no_store),
            )
        try:
            async with self.coalescer.attend(flight, ctx), aclosing(flight.batches()) as batches:
                async for batch in batches:
                    if ctx is not flight.origin:
                        # The router times and bills the origin; attendees are ours to fill.
                        if ctx.first_token_at is None:
                            ctx.first_token_at = time.perf_counter()
                        ctx.usage = last_usage(batch) or ctx.usage
                    for chunk in batch:
                        yield chunk
        except BaseException:
            await self._settle_leaver(ctx, flight)
            raise
        self._settle(ctx, flight, None)

    # --- steps --------------------------------------------------------------------------

    def _plan(self, ctx: RequestContext, request: ChatRequest) -> _Plan | None:
        """The key and TTL when this request may be cached, else None."""
        group = ctx.model_group or request.model
        settings = self._groups.get(group)
        if settings is not None and not settings.enabled:
            return None
        deterministic = request.temperature == 0 or request.seed is not None
        if not deterministic and not (settings is not None and settings.cache_all):
            return None
        namespace = (ctx.api_key_id or "-") if self.namespace_by_key else None
        ttl = settings.ttl if settings is not None and settings.ttl is not None else self.ttl
        try:
            key = cache_key(request, group, namespace=namespace)
        except Exception:
            # A value the key's encoder refuses (a library caller's object in ``extra``):
            # a broken cache must never break a request. Raised from stream(), it would
            # also escape the router's settlement of the request.
            self.stats.errors += 1
            log.exception("cache: could not key the request; passing it through")
            return None
        # A flight may end up served by any of its caller's fallbacks (final here: the
        # accounting hooks have narrowed them), and nobody knows which until it answers:
        # only callers with the same fallbacks share one, so none gets an answer from a
        # group it may not use. Without fallbacks (the usual case) it is the cache key.
        fallbacks = ctx.fallback_groups
        flight_key = f"{key} via {fallbacks!r}" if fallbacks else key
        return _Plan(key, ttl, group, flight_key)

    async def _find_or_lookup(
        self, ctx: RequestContext, plan: _Plan, coalescing: bool, *, streaming: bool
    ) -> Flight | CacheEntry | None:
        """A flight to attend (only when ``coalescing``), a stored entry (the context is
        marked as a hit), or None."""
        flight = self.coalescer.find(plan.flight_key) if coalescing else None
        found = None if flight is None else _joinable(flight, streaming)
        if found is None:
            # The lookup, inline (a coroutine less for every request).
            data = None
            breaker = self.breaker
            if breaker.allow():
                try:
                    data = await self.backend.get(plan.key)
                except Exception as exc:  # noqa: BLE001 - a broken cache must never break a request
                    self._lookup_failed(exc)
                except BaseException:
                    breaker.released()
                    raise
                else:
                    breaker.succeeded()
            if data is not None:
                found = self._decode(data)
                if found is not None and not _may_serve(found, ctx):
                    found = None
            if found is None and coalescing:
                # Someone may have launched the same request while we were looking.
                flight = self.coalescer.find(plan.flight_key)
                if flight is None:
                    return None
                found = _joinable(flight, streaming)
        if isinstance(found, CacheEntry):
            self._mark(ctx, "hit")
            ctx.usage = found.usage
        elif found is not None:
            self._mark(ctx, "coalesced")
        else:
            return None
        ctx.cost = 0.0
        ctx.cost_source = "cache"
        return found

    def _take_over(self, ctx: RequestContext) -> None:
        """An attendee that now pays for the upstream call is a miss, priced by the router,
        and counted as one instead of as coalesced: it calls upstream itself (a
        non-streaming flight whose caller left), or inherits the bill of a streaming
        flight whose launching client left."""
        self.stats.coalesced -= 1
        self._mark(ctx, "miss")
        ctx.cost, ctx.cost_source = None, None

    def _settle(self, ctx: RequestContext, flight: Flight, response: ChatResponse | None) -> None:
        """Fill an attendee's context once the flight answered."""
        if ctx is flight.payer:
            # The whole call, read from the flight: not the origin's usage (when it left
            # early, the router counted only what it had received), and also for a payer
            # that stopped reading after the call had completed.
            usage = response.usage if response is not None else _flight_usage(flight)
            if usage is not None:
                ctx.usage = usage
        if ctx is flight.origin:
            return  # the router filled the rest while calling upstream
        origin = flight.origin
        if ctx is flight.payer:
            self._inherit_bill(ctx, origin)  # the launching client left early
            return
        ctx.deployment, ctx.provider, ctx.upstream_model = (
            origin.deployment,
            origin.provider,
            origin.upstream_model,
        )
        if response is not None:
            ctx.usage = response.usage
        elif ctx.usage is None:
            ctx.usage = origin.usage

    async def _settle_leaver(self, ctx: RequestContext, flight: Flight) -> None:
        """An attendee left (cancelled, stream closed) or failed. One request pays for a
        streaming flight, once: the one holding its bill when it ends (see
        :attr:`Flight.payer`), so that the call is billed neither twice nor not at all."""
        if ctx is not flight.payer:
            if ctx is flight.origin:
                self._hand_over(ctx)  # the next in line holds the bill now
            return
        if flight.done and flight.error is None:
            # The answer was produced, and stored for everyone: the whole call.
            self._settle(ctx, flight, None)
            if _flight_usage(flight) is not None:
                return
            # Upstream reported no usage: counted below, as all of it may not have been read.
        elif ctx is not flight.origin:
            self._inherit_bill(ctx, flight.origin)
        if flight.shared and _reached_upstream(flight):
            # The last one attending (its leaving stopped the call), the payer of a call
            # that failed, or of one that completed without usage: it pays for the output
            # the flight produced, not only what it read (others may have read further; a
            # slow reader lags behind; a non-streaming request read none of it).
            await to_completion(_count_flight_usage(ctx, flight))
        # A launching client nobody joined: the router bills what it received, as for any
        # stream without a cache.

    def _inherit_bill(self, ctx: RequestContext, origin: RequestContext) -> None:
        """An attendee pays for a streaming flight whose launching client left: priced by
        the router from its usage and the origin's deployment, like any miss."""
        ctx.deployment, ctx.provider, ctx.upstream_model = (
            origin.deployment,
            origin.provider,
            origin.upstream_model,
        )
        self._take_over(ctx)
        ctx.attempts, ctx.fallbacks = origin.attempts, origin.fallbacks

    def _hand_over(self, ctx: RequestContext) -> None:
        """The client that launched a streaming flight left before the end while others
        attend: its bill went to the next in line, who pays for the whole call. It is
        billed zero, as coalesced (the router records the tokens it received)."""
        self.stats.misses -= 1
        self._mark(ctx, "coalesced")
        ctx.cost, ctx.cost_source = 0.0, "cache"

    def _lookup_failed(self, exc: Exception) -> None:
        """The backend's lookup raised: a miss, and unless the error is about the entry,
        the backend is left alone for a while."""
        if is_entry_error(exc):
            self.breaker.succeeded()  # the backend answered, about this entry
            self._unreadable(exc)
            return
        self.stats.errors += 1
        self.breaker.failed("lookup", exc)

    def _decode(self, data: bytes) -> CacheEntry | None:
        try:
            return decode_entry(data)
        except Exception as exc:  # noqa: BLE001 - an entry it cannot read is a miss
            self._unreadable(exc)
            return None

    def _unreadable(self, exc: Exception) -> None:
        """An entry the cache cannot read is a miss (the answer fetched is stored over it)."""
        self.stats.errors += 1
        log.warning("cache: reading the entry failed (%s: %s); treating as a miss", type(exc).__name__, exc)

    async def _store(
        self,
        plan: _Plan,
        caller: RequestContext,
        *,
        response: ChatResponse | None = None,
        chunks: list[ChatChunk] | None = None,
        storable: bool | None = None,
    ) -> None:
        """Store the answer ``caller``'s upstream call got (``storable``: already checked
        with :func:`is_storable`), with the fallback group that served it, if one did."""
        if storable is None:
            answer = response if response is not None else (chunks or [])
            storable = is_storable(answer, store_truncated=self.store_truncated)
        if not storable:
            self.stats.skipped += 1
            return
        served = caller.model_group  # the router sets it to the group that answered
        data = encode_entry(response=response, chunks=chunks, group=served if served != plan.group else None)
        if self.max_entry_bytes is not None and len(data) > self.max_entry_bytes:
            self.stats.skipped += 1
            return
        breaker = self.breaker
        if not breaker.allow():
            self.stats.skipped += 1
            return
        try:
            stored = await self.backend.set(plan.key, data, plan.ttl)
        except Exception as exc:  # noqa: BLE001 - the answer is already on its way; only the store is lost
            self.stats.errors += 1
            self.stats.skipped += 1
            breaker.failed("store", exc)
            return
        except BaseException:
            breaker.released()
            raise
        breaker.succeeded()
        if stored is False:  # larger than the backend's whole bound
            self.stats.skipped += 1
        else:  # True, or None from a backend written before set() said (stored, then)
            self.stats.stores += 1

    async def _store_flight(self, plan: _Plan, flight: Flight, *, store: bool) -> None:
        """Store a flight's answer; until that lands, identical requests are served it."""
        # Decided before the first await: attendees woken by the finish run after it.
        if not store:
            self.stats.skipped += 1
            return
        chunks = list(flight.chunks) if flight.streaming else None
        answer = flight.response if chunks is None else chunks
        flight.reusable = answer is not None and is_storable(answer, store_truncated=self.store_truncated)
        await self._store(
            plan, flight.origin, response=flight.response, chunks=chunks, storable=flight.reusable
        )

    def _upstream(
        self, ctx: RequestContext, plan: _Plan, call: Callable[[], AsyncIterator[ChatChunk]]
    ) -> AsyncIterator[ChatChunk]:
        """The stream from upstream in the caller's own task: ``call()``'s own iterator
        when the request says not to store it, else stored once complete."""
        return call() if ctx.no_store else self._pass_through(ctx, plan, call)

    async def _pass_through(
        self, ctx: RequestContext, plan: _Plan, call: Callable[[], AsyncIterator[ChatChunk]]
    ) -> AsyncIterator[ChatChunk]:
        """Stream from upstream in the caller's own task, and store the stream once complete."""
        chunks: list[ChatChunk] = []
        async with aclosing(call()) as upstream:  # type: ignore[type-var]
            async for chunk in upstream:
                chunks.append(chunk)
                yield chunk
        await self._store(plan, ctx, chunks=chunks)

    def _mark(self, ctx: RequestContext, status: CacheStatus) -> None:
        ctx.cache_status = status
        if status == "hit":
            self.stats.hits += 1
        elif status == "miss":
            self.stats.misses += 1
        elif status == "coalesced":
            self.stats.coalesced += 1
        else:
            self.stats.bypasses += 1

    def _can_coalesce(self) -> bool:
        # Flights run as asyncio tasks detached from any client's cancel scope.
        return self.coalesce and on_asyncio()


def _may_serve(entry: CacheEntry, ctx: RequestContext) -> bool:
    """Whether a stored answer may answer ``ctx``: not older than it takes
    (``Cache-Control: max-age``), and served by the group it named or by one of the
    fallbacks it may use. A key allowed only its group, which is down, must fail as it
    would without the cache, not get the answer a fallback gave a key allowed that."""
    if ctx.max_age is not None and time.time() - entry.stored_at > ctx.max_age:
        return False
    return entry.group is None or entry.group in ctx.fallback_groups


def _joinable(flight: Flight, streaming: bool) -> Flight | CacheEntry | None:
    """What a request may take from the flight in progress for its key: the flight; a
    finished one only while its answer is being stored (served as a hit), never one that
    failed. A streaming request does not attend a non-streaming flight in progress: it
    could not take its call over. (Its answer came from a group this caller may use: the
    flight's key holds its fallbacks.)"""
    if not flight.done:
        return flight if flight.task is not None or not streaming else None
    return _entry_of(flight) if flight.reusable and flight.error is None else None


def _entry_of(flight: Flight) -> CacheEntry:
    if flight.streaming:
        return CacheEntry(chunks=list(flight.chunks))
    return CacheEntry(response=flight.response)


def _flight_usage(flight: Flight) -> Usage | None:
    """The usage upstream reported for the whole call (None when it reported none)."""
    if flight.response is not None:
        return flight.response.usage
    return last_usage(flight.chunks)


def _reached_upstream(flight: Flight) -> bool:
    """Whether the flight's call has anything to bill: output, or a deployment that read
    the prompt (the router's rule for a stream that ended early; an upstream error before
    the first chunk is billed nothing)."""
    return bool(flight.chunks) or flight.origin.deployment is not None


async def _count_flight_usage(ctx: RequestContext, flight: Flight) -> None:
    """Set ``ctx.usage`` to the prompt and the output the flight has published, counted
    as the router counts a cancelled stream's (in the work :func:`to_completion` runs: a
    cancellation it passes on afterwards must not lose the count)."""
    usage = last_usage(flight.chunks)
    if usage is None:
        text = "".join(
            choice.delta.content
            for chunk in flight.chunks
            for choice in chunk.choices
            if choice.delta.content
        )
        usage = await estimated_usage(ctx, text)
    ctx.usage = usage


def _stream_producer(call: Callable[[], AsyncIterator[ChatChunk]]) -> Callable[[Flight], Awaitable[None]]:
    async def produce(flight: Flight) -> None:
        # aclosing: when the flight is cancelled, the provider's generator closes
        # upstream in this same task.
        async with aclosing(call()) as upstream:  # type: ignore[type-var]
            await flight.relay(upstream)

    return produce


def build_backend(settings: CacheConfig, *, clock: Callable[[], float] | None = None) -> CacheBackend | None:
    """The backend ``settings.backend`` names (None for ``none``); imports it lazily."""
    if settings.backend == "none":
        return None
    if settings.backend == "memory":
        from llmrouter.cache.memory import MemoryBackend

        return MemoryBackend(max_bytes=settings.max_bytes, clock=clock or time.monotonic)
    if settings.backend == "sqlite":
        from llmrouter.cache.sqlite import SQLiteBackend

        return SQLiteBackend(
            settings.sqlite_path,
            table=settings.sqlite_table,
            max_bytes=settings.max_bytes,
            clock=clock or time.time,
        )
    from llmrouter.cache.redis import RedisBackend

    return RedisBackend(settings.redis_url, prefix=settings.redis_prefix)
