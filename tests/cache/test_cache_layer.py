"""The cache layer on its own: what is cached, Cache-Control, billing fields, streams."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest

from llmrouter.cache import MemoryBackend, ResponseCache
from llmrouter.cache.breaker import Breaker
from llmrouter.cache.sqlite import SQLiteBackend
from llmrouter.config import GroupCache, parse_config
from llmrouter.errors import UpstreamError

pytestmark = pytest.mark.anyio


async def ask(
    cache: ResponseCache, upstream: Any, helpers: Any, request: Any = None, **ctx_fields: Any
) -> tuple[Any, Any]:
    ctx = helpers.new_ctx(**ctx_fields)
    response = await cache.chat(ctx, request or helpers.chat_request(), upstream.call(ctx))
    return ctx, response


async def ask_stream(
    cache: ResponseCache, upstream: Any, helpers: Any, request: Any = None, **ctx_fields: Any
) -> tuple[Any, list[Any]]:
    ctx = helpers.new_ctx(**ctx_fields)
    chunks = [
        c async for c in cache.stream(ctx, request or helpers.chat_request(stream=True), upstream.stream(ctx))
    ]
    return ctx, chunks


async def test_miss_then_hit_billed_at_zero(cache: ResponseCache, upstream: Any, helpers: Any) -> None:
    first, answer = await ask(cache, upstream, helpers)
    assert first.cache_status == "miss" and first.cost_source is None
    request = helpers.chat_request(user="someone-else")
    second, again = await ask(cache, upstream, helpers, request, request_id="other")
    assert again == answer
    assert upstream.calls == 1
    assert second.cache_status == "hit"
    assert (second.cost, second.cost_source) == (0.0, "cache")
    assert second.usage == answer.usage  # the ledger still sees the tokens
    assert second.first_token_at is not None
    snap = cache.snapshot()
    assert (snap["hits"], snap["misses"], snap["stores"], snap["entries"]) == (1, 1, 1, 1)
    assert snap["bytes"] > 0 and snap["hit_ratio"] == 0.5


@pytest.mark.parametrize(
    ("fields", "group", "cached"),
    [
        ({"temperature": 0}, None, True),
        ({"temperature": 0.7, "seed": 42}, None, True),
        ({"temperature": 0.7}, None, False),
        ({"temperature": None}, None, False),  # provider default sampling
        ({"temperature": 0.7}, GroupCache(cache_all=True), True),
        ({"temperature": 0}, GroupCache(enabled=False), False),
    ],
)
async def test_cacheability(
    fields: dict[str, Any], group: GroupCache | None, cached: bool, upstream: Any, helpers: Any
) -> None:
    cache = ResponseCache(MemoryBackend(), groups={"g": group} if group else None)
    request = helpers.chat_request(**fields)
    ctx, _ = await ask(cache, upstream, helpers, request)
    assert ctx.cache_status == ("miss" if cached else "bypass")
    ctx, _ = await ask(cache, upstream, helpers, request)
    assert ctx.cache_status == ("hit" if cached else "bypass")
    assert upstream.calls == (1 if cached else 2)


async def test_errors_and_truncated_answers_are_not_stored(cache: ResponseCache, helpers: Any) -> None:
    failing = helpers.Upstream()
    failing.error = UpstreamError("boom")
    with pytest.raises(UpstreamError):
        await ask(cache, failing, helpers)
    truncated = helpers.Upstream(finish_reason="length")
    await ask(cache, truncated, helpers)
    ctx, _ = await ask(cache, truncated, helpers)
    assert ctx.cache_status == "miss" and truncated.calls == 2
    assert cache.snapshot()["entries"] == 0 and cache.stats.skipped == 2


async def test_truncated_answers_stored_when_configured(helpers: Any) -> None:
    cache = ResponseCache(MemoryBackend(), store_truncated=True)
    truncated = helpers.Upstream(finish_reason="length")
    await ask(cache, truncated, helpers)
    ctx, _ = await ask(cache, truncated, helpers)
    assert ctx.cache_status == "hit"


async def test_no_cache_skips_lookup_and_refreshes(cache: ResponseCache, helpers: Any) -> None:
    old = helpers.Upstream(words=("old",))
    await ask(cache, old, helpers)
    new = helpers.Upstream(words=("new",))
    ctx, answer = await ask(cache, new, helpers, no_cache=True)
    assert ctx.cache_status == "bypass" and new.calls == 1
    assert answer.choices[0].message.content == "new"
    ctx, answer = await ask(cache, new, helpers)
    assert ctx.cache_status == "hit" and answer.choices[0].message.content == "new"


async def test_no_store_reads_but_never_writes(cache: ResponseCache, upstream: Any, helpers: Any) -> None:
    ctx, _ = await ask(cache, upstream, helpers, no_store=True)
    assert ctx.cache_status == "miss"
    ctx, _ = await ask(cache, upstream, helpers, no_store=True)
    assert ctx.cache_status == "miss" and upstream.calls == 2
    await ask(cache, upstream, helpers)  # stored now
    ctx, _ = await ask(cache, upstream, helpers, no_store=True)
    assert ctx.cache_status == "hit"


async def test_group_ttl_wins_over_default(helpers: Any, clock: Any, upstream: Any) -> None:
    cache = ResponseCache(MemoryBackend(clock=clock), ttl=3600, groups={"g": GroupCache(ttl=5)})
    await ask(cache, upstream, helpers)
    clock.advance(4)
    assert (await ask(cache, upstream, helpers))[0].cache_status == "hit"
    clock.advance(2)
    assert (await ask(cache, upstream, helpers))[0].cache_status == "miss"


async def test_namespace_by_key_keeps_keys_apart(helpers: Any, upstream: Any) -> None:
    cache = ResponseCache(MemoryBackend(), namespace_by_key=True)
    await ask(cache, upstream, helpers, api_key_id="alice")
    assert (await ask(cache, upstream, helpers, api_key_id="bob"))[0].cache_status == "miss"
    assert (await ask(cache, upstream, helpers, api_key_id="alice"))[0].cache_status == "hit"
    shared = ResponseCache(MemoryBackend())
    await ask(shared, upstream, helpers, api_key_id="alice")
    assert (await ask(shared, upstream, helpers, api_key_id="bob"))[0].cache_status == "hit"


async def test_stream_cached_then_replayed_identically(
    cache: ResponseCache, upstream: Any, helpers: Any
) -> None:
    first, chunks = await ask_stream(cache, upstream, helpers)
    assert first.cache_status == "miss" and chunks == upstream.chunks()
    second, replayed = await ask_stream(cache, upstream, helpers)
    assert second.cache_status == "hit" and upstream.calls == 1
    assert replayed == chunks  # same boundaries, role chunk and final usage chunk
    assert second.usage == chunks[-1].usage and second.cost == 0.0


async def test_stream_and_non_stream_share_entries(cache: ResponseCache, upstream: Any, helpers: Any) -> None:
    await ask_stream(cache, upstream, helpers)
    ctx, response = await ask(cache, upstream, helpers)
    assert ctx.cache_status == "hit" and response == upstream.response()
    other = helpers.Upstream()
    await ask(cache, other, helpers, helpers.chat_request("another question"))
    ctx, rechunked = await ask_stream(
        cache, other, helpers, helpers.chat_request("another question", stream=True)
    )
    assert ctx.cache_status == "hit" and other.calls == 1
    assert rechunked[-1].usage == other.usage and rechunked[-1].choices == []
    assert (
        "".join(c.choices[0].delta.content or "" for c in rechunked if c.choices) == "Paris is the capital."
    )


async def test_incomplete_stream_is_not_stored(cache: ResponseCache, helpers: Any) -> None:
    broken = helpers.Upstream()
    broken.error = UpstreamError("cut off mid-stream")
    with pytest.raises(UpstreamError):
        await ask_stream(cache, broken, helpers)
    assert cache.snapshot()["entries"] == 0
    slow = helpers.Upstream()
    slow.hold()  # every chunk after the first waits
    ctx = helpers.new_ctx()
    stream = cache.stream(ctx, helpers.chat_request(stream=True), slow.stream(ctx))
    await stream.__anext__()  # the client reads one chunk and goes away
    await stream.aclose()
    assert slow.cancelled == 1  # nobody else wanted it: upstream was closed
    assert cache.snapshot()["entries"] == 0 and len(cache.coalescer) == 0


async def test_uncacheable_stream_passes_through(cache: ResponseCache, upstream: Any, helpers: Any) -> None:
    ctx, chunks = await ask_stream(
        cache, upstream, helpers, helpers.chat_request(temperature=1.0, stream=True)
    )
    assert ctx.cache_status == "bypass" and chunks == upstream.chunks()
    assert cache.coalescer.find("anything") is None and len(cache.coalescer) == 0
    # Upstream's own iterator: no generator of the cache's around it (a layer per chunk).
    ctx = helpers.new_ctx()
    made: list[Any] = []

    def call() -> Any:
        made.append(upstream.stream(ctx)())
        return made[-1]

    assert cache.stream(ctx, helpers.chat_request(temperature=1.0, stream=True), call) is made[0]


class BrokenBackend(MemoryBackend):
    """Fails every call while ``down``; counts the calls that reach it."""

    name = "broken"

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.calls = 0

    async def get(self, key: str) -> bytes | None:
        self.calls += 1
        if self.down:
            raise ConnectionError("backend down")
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float | None) -> bool:
        self.calls += 1
        if self.down:
            raise ConnectionError("backend down")
        return await super().set(key, value, ttl)


async def test_a_broken_backend_means_misses_not_errors(upstream: Any, helpers: Any) -> None:
    cache = ResponseCache(BrokenBackend())
    for _ in range(2):
        ctx, response = await ask(cache, upstream, helpers)
        assert ctx.cache_status == "miss" and response == upstream.response()
    assert upstream.calls == 2


async def test_a_failing_backend_is_left_alone_then_tried_again(
    upstream: Any, helpers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    backend = BrokenBackend()
    cache = ResponseCache(backend)
    cache.breaker = Breaker(pause=5.0, clock=lambda: now[0])
    await ask(cache, upstream, helpers)  # the lookup fails: no store tried either
    for _ in range(3):
        ctx, _ = await ask(cache, upstream, helpers)
        assert ctx.cache_status == "miss"
    assert backend.calls == 1 and cache.stats.errors == 1 and cache.stats.skipped == 4
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "cache: lookup failed (ConnectionError: backend down); not using the backend for 5 s"
    ]
    now[0] = 5.0  # one request tries again, and fails: another pause
    await ask(cache, upstream, helpers)
    assert backend.calls == 2
    now[0] = 10.0
    backend.down = False
    ctx, _ = await ask(cache, upstream, helpers)  # tried again: it answers, and stores
    assert ctx.cache_status == "miss" and backend.calls == 4 and not cache.breaker.paused
    ctx, _ = await ask(cache, upstream, helpers)
    assert ctx.cache_status == "hit" and upstream.calls == 6


async def test_while_one_call_tries_the_backend_again_the_others_skip_it() -> None:
    now = [0.0]
    breaker = Breaker(pause=1.0, clock=lambda: now[0])
    breaker.failed("lookup", ConnectionError("down"))
    assert not breaker.allow()
    now[0] = 1.0
    assert breaker.allow() and not breaker.allow()  # one try at a time
    breaker.released()  # that one was cancelled: the next may try
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.allow() and breaker.allow() and not breaker.paused


@pytest.mark.parametrize(
    "stored",
    [
        b"\x01garbage",
        # Entries that decode but hold no answer: served, they were a 200 without choices.
        msgspec.msgpack.encode({"chunks": []}),
        msgspec.msgpack.encode({"response": {"choices": []}}),
    ],
)
async def test_garbage_in_the_backend_is_a_miss(upstream: Any, helpers: Any, stored: bytes) -> None:
    backend = MemoryBackend()
    cache = ResponseCache(backend)
    ctx, _ = await ask(cache, upstream, helpers)
    key = next(iter(backend._items))
    await backend.set(key, stored, None)
    ctx, response = await ask(cache, upstream, helpers)
    assert ctx.cache_status == "miss" and response == upstream.response()
    assert cache.stats.errors == 1
    ctx, chunks = await ask_stream(cache, upstream, helpers)
    assert ctx.cache_status == "hit" and chunks  # the answer fetched was stored over it


class OneBadEntry(MemoryBackend):
    """Raises for the keys in ``bad`` until they are stored over, as a backend does that
    reads a value of a type it does not expect (a SQLite TEXT value into ``bytes``)."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: set[str] = set()

    async def get(self, key: str) -> bytes | None:
        if key in self.bad:
            raise TypeError("cannot convert 'str' object to bytes")
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float | None) -> bool:
        self.bad.discard(key)
        return await super().set(key, value, ttl)


async def test_an_entry_the_backend_cannot_read_is_a_miss_for_its_key_only(
    upstream: Any, helpers: Any
) -> None:
    """Taken for a failing backend, it left the backend alone for everyone, and its own
    answer was never stored over it (stores skipped meanwhile)."""
    backend = OneBadEntry()
    cache = ResponseCache(backend)
    victim, bystander = helpers.chat_request("victim"), helpers.chat_request("bystander")
    await ask(cache, upstream, helpers, victim)
    backend.bad.add(next(iter(backend._items)))
    await ask(cache, upstream, helpers, bystander)
    ctx, response = await ask(cache, upstream, helpers, victim)
    assert ctx.cache_status == "miss" and response == upstream.response()
    assert cache.stats.errors == 1 and not cache.breaker.paused
    ctx, _ = await ask(cache, upstream, helpers, bystander)
    assert ctx.cache_status == "hit"
    ctx, _ = await ask(cache, upstream, helpers, victim)
    assert ctx.cache_status == "hit"  # the answer fetched was stored over it


async def test_entries_above_max_entry_bytes_are_not_stored(upstream: Any, helpers: Any) -> None:
    cache = ResponseCache(MemoryBackend(), max_entry_bytes=50)
    await ask(cache, upstream, helpers)
    assert cache.snapshot()["entries"] == 0 and cache.stats.skipped == 1


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_an_answer_larger_than_the_backends_bound_is_skipped_not_stored(
    kind: str, sqlite_path: Path, upstream: Any, helpers: Any
) -> None:
    backend = MemoryBackend(max_bytes=300) if kind == "memory" else SQLiteBackend(sqlite_path, max_bytes=100)
    cache = ResponseCache(backend)
    await ask(cache, upstream, helpers)
    assert (cache.stats.stores, cache.stats.skipped, cache.snapshot()["entries"]) == (0, 1, 0)
    await cache.aclose()


async def test_sqlite_backed_cache_survives_a_restart(sqlite_path: Path, upstream: Any, helpers: Any) -> None:
    cache = ResponseCache(SQLiteBackend(sqlite_path))
    await cache.start()
    await ask_stream(cache, upstream, helpers)
    await cache.aclose()
    restarted = ResponseCache(SQLiteBackend(sqlite_path))
    await restarted.start()
    ctx, chunks = await ask_stream(restarted, upstream, helpers)
    assert ctx.cache_status == "hit" and chunks == upstream.chunks()
    await restarted.aclose()


def test_from_config_reads_groups_and_aliases(tmp_path: Path) -> None:
    config = parse_config(
        {
            "cache": {"backend": "memory", "ttl": 10, "namespace_by_key": True, "coalesce": False},
            "models": [
                {
                    "name": "g",
                    "aliases": ["a"],
                    "deployments": [{"provider": "p", "model": "m"}],
                    "cache": {"ttl": 99, "cache_all": True},
                }
            ],
        },
        env={},
    )
    cache = ResponseCache.from_config(config)
    assert cache is not None
    assert cache.ttl == 10 and cache.namespace_by_key and not cache.coalesce
    assert cache._groups["a"] == cache._groups["g"] == GroupCache(ttl=99, cache_all=True)
    assert ResponseCache.from_config(parse_config({"cache": {"backend": "none"}}, env={})) is None


def test_bad_cache_config_names_the_field() -> None:
    from llmrouter.errors import ConfigError

    with pytest.raises(ConfigError, match=r"cache.backend"):
        parse_config({"cache": {"backend": "memcached"}}, env={})
    with pytest.raises(ConfigError, match=r"cache"):
        parse_config({"cache": {"tll": 5}}, env={})
    config = parse_config({}, env={"LLMROUTER__CACHE__BACKEND": "redis", "LLMROUTER__CACHE__TTL": "30"})
    assert (config.cache.backend, config.cache.ttl) == ("redis", 30.0)


@pytest.mark.redis
async def test_replicas_share_answers_through_redis(redis_prefix: str, upstream: Any, helpers: Any) -> None:
    from llmrouter.cache.redis import RedisBackend

    replica_a = ResponseCache(RedisBackend(prefix=redis_prefix), ttl=30)
    replica_b = ResponseCache(RedisBackend(prefix=redis_prefix), ttl=30)
    try:
        ctx, chunks = await ask_stream(replica_a, upstream, helpers)
        assert ctx.cache_status == "miss"
        ctx, replayed = await ask_stream(replica_b, upstream, helpers)
        assert ctx.cache_status == "hit" and replayed == chunks and upstream.calls == 1
        ctx, _ = await ask(replica_b, upstream, helpers)
        assert ctx.cache_status == "hit"
    finally:
        await replica_a.clear()
        await replica_a.aclose()
        await replica_b.aclose()
