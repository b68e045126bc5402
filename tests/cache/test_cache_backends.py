"""Each backend for real: memory, SQLite (a temporary file) and Redis on 127.0.0.1:6379."""

from __future__ import annotations

import sqlite3
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from llmrouter.cache import CacheBackend, CacheConfig, MemoryBackend, build_backend
from llmrouter.cache.memory import ENTRY_OVERHEAD
from llmrouter.cache.redis import RedisBackend
from llmrouter.cache.sqlite import SQLiteBackend
from llmrouter.errors import ConfigError

pytestmark = pytest.mark.anyio

KINDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=KINDS)
async def backend(
    request: Any, sqlite_path: Path, redis_prefix: str, clock: Any
) -> AsyncIterator[CacheBackend]:
    kind = request.param
    made: CacheBackend
    if kind == "memory":
        made = MemoryBackend(max_bytes=0, clock=clock)
    elif kind == "sqlite":
        made = SQLiteBackend(sqlite_path, max_bytes=0, clock=clock)
    else:
        made = RedisBackend("redis://127.0.0.1:6379/0", prefix=redis_prefix)
    await made.start()
    try:
        yield made
    finally:
        await made.clear()
        await made.aclose()


async def test_set_get_overwrite_delete(backend: CacheBackend) -> None:
    assert await backend.get("k1") is None
    assert await backend.set("k1", b"one", 60) is True
    assert await backend.set("k2", b"\x00\xffbinary", None) is True
    assert await backend.get("k1") == b"one"
    assert await backend.get("k2") == b"\x00\xffbinary"
    await backend.set("k1", b"uno", 60)
    assert await backend.get("k1") == b"uno"
    await backend.delete("k1")
    await backend.delete("absent")
    assert await backend.get("k1") is None
    assert await backend.get("k2") == b"\x00\xffbinary"
    stats = backend.stats()
    if stats.entries is not None:  # Redis does not count
        assert stats.entries == 1
        overhead = ENTRY_OVERHEAD if isinstance(backend, MemoryBackend) else 0
        assert stats.bytes == len("k2") + len(b"\x00\xffbinary") + overhead


async def test_clear_drops_everything_of_this_cache(backend: CacheBackend) -> None:
    for i in range(5):
        await backend.set(f"key{i}", b"v" * i, 60)
    assert await backend.clear() == 5
    for i in range(5):
        assert await backend.get(f"key{i}") is None


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_ttl_expires_on_the_clock(kind: str, sqlite_path: Path, clock: Any) -> None:
    made: CacheBackend = (
        MemoryBackend(clock=clock) if kind == "memory" else SQLiteBackend(sqlite_path, clock=clock)
    )
    await made.start()
    await made.set("short", b"s", 10)
    await made.set("forever", b"f", None)
    clock.advance(9.9)
    assert await made.get("short") == b"s"
    clock.advance(0.2)
    assert await made.get("short") is None
    assert await made.get("forever") == b"f"
    stats = made.stats()
    assert stats.expirations == 1
    assert stats.entries == 1
    await made.aclose()


async def test_memory_lru_eviction_by_bytes(clock: Any) -> None:
    # Each entry is 2 (key) + 10 (value) + ENTRY_OVERHEAD bytes; three fit, not four.
    entry = 12 + ENTRY_OVERHEAD
    made = MemoryBackend(max_bytes=3 * entry + 10, clock=clock)
    for name in ("k1", "k2", "k3"):
        await made.set(name, b"x" * 10, 60)
    assert await made.get("k1") is not None  # k1 is now the most recently used
    await made.set("k4", b"x" * 10, 60)
    assert await made.get("k2") is None  # the least recently used went
    assert all([await made.get(k) for k in ("k1", "k3", "k4")])
    stats = made.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (3, 3 * entry, 1)


async def test_memory_bound_holds_the_memory_the_entries_take() -> None:
    # Small answers, where the per-entry bookkeeping weighs most: counting only keys and
    # values let the entries take nearly twice the bound.
    bound = 1 << 20
    made = MemoryBackend(max_bytes=bound)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            await made.set(f"chat:{i:064x}", bytes(200), None)
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert made.stats().evictions > 0
    assert taken <= bound * 1.1, f"{taken} bytes held under a bound of {bound}"


async def test_memory_refuses_an_entry_larger_than_the_bound() -> None:
    made = MemoryBackend(max_bytes=20 + ENTRY_OVERHEAD)
    await made.set("small", b"x", None)
    await made.set("huge", b"x" * 100, None)
    assert await made.get("huge") is None
    assert await made.get("small") == b"x"  # and nothing was evicted for it
    assert made.stats().evictions == 0


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_set_says_it_refused_an_entry_larger_than_the_bound(kind: str, sqlite_path: Path) -> None:
    """The layer counts such an answer as skipped, not stored."""
    made: CacheBackend
    if kind == "memory":
        made = MemoryBackend(max_bytes=100 + ENTRY_OVERHEAD)
    else:
        made = SQLiteBackend(sqlite_path, max_bytes=100)
    assert await made.set("small", b"x", None) is True
    assert await made.set("huge", b"x" * 200, None) is False
    assert await made.get("huge") is None
    await made.aclose()


async def test_sqlite_lru_eviction_by_bytes_and_persistence(sqlite_path: Path, clock: Any) -> None:
    made = SQLiteBackend(sqlite_path, max_bytes=40, clock=clock)
    for name in ("k1", "k2", "k3"):
        await made.set(name, b"x" * 10, 60)
        clock.advance(1)
    assert await made.get("k1") is not None
    clock.advance(1)
    await made.set("k4", b"x" * 10, 60)
    assert await made.get("k2") is None
    assert made.stats().evictions == 1
    await made.aclose()
    # A new process (another worker) sees the same entries and totals.
    again = SQLiteBackend(sqlite_path, max_bytes=40, clock=clock)
    await again.start()
    assert await again.get("k4") == b"x" * 10
    assert (again.stats().entries, again.stats().bytes) == (3, 36)
    await again.aclose()


async def test_sqlite_shares_a_file_with_other_tables(sqlite_path: Path) -> None:
    import sqlite3

    with sqlite3.connect(sqlite_path) as db:
        db.execute("CREATE TABLE ledger (id INTEGER PRIMARY KEY, cost REAL)")
        db.execute("INSERT INTO ledger (cost) VALUES (1.5)")
    made = SQLiteBackend(sqlite_path, table="answers")
    await made.set("k", b"v", None)
    assert await made.clear() == 1
    await made.aclose()
    with sqlite3.connect(sqlite_path) as db:
        assert db.execute("SELECT cost FROM ledger").fetchall() == [(1.5,)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.fixture
async def sqlite_backends(sqlite_path: Path) -> AsyncIterator[Callable[..., SQLiteBackend]]:
    """Makes SQLite backends on ``sqlite_path`` (another worker each), closed at teardown
    even when the test fails (an open connection's thread would keep pytest from exiting)."""
    made: list[SQLiteBackend] = []

    def make(**options: Any) -> SQLiteBackend:
        made.append(SQLiteBackend(sqlite_path, **options))
        return made[-1]

    yield make
    for backend in made:
        await backend.aclose()


def _stored(path: Path) -> tuple[int, int]:
    """What the cache table really holds: (entries, bytes)."""
    import sqlite3

    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM llmrouter_cache").fetchone()


@pytest.mark.parametrize(("value_bytes", "stores"), [(998, 8), (98, 300)])
async def test_sqlite_bound_holds_for_workers_sharing_the_file(
    sqlite_backends: Any, sqlite_path: Path, value_bytes: int, stores: int
) -> None:
    """Two worker processes' backends on one file: each counts only its own stores, so
    each re-reads the true total every max_bytes / 16 it stores. Large entries: the bound
    holds after every store; small ones: it is passed by at most workers x max_bytes / 16."""
    bound = 10_000
    workers = [sqlite_backends(max_bytes=bound) for _ in range(2)]
    for worker in workers:
        await worker.start()
    for i in range(stores):
        for name, worker in zip("ab", workers, strict=True):
            await worker.set(f"{name}{i}", b"x" * value_bytes, None)  # keys of 2 to 4 bytes
            assert _stored(sqlite_path)[1] <= bound + len(workers) * (bound // 16 + value_bytes + 4)
    if value_bytes > bound // 16:
        assert _stored(sqlite_path)[1] <= bound


async def test_sqlite_full_cache_reads_its_total_once_per_sixteenth_stored(
    sqlite_backends: Any, sqlite_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the total reads every row: eviction goes down to 15/16 of the bound, so a
    full cache does it once per sixteenth stored, not on every store (87 stores a second
    on a full 16 MiB cache of 4 KB answers, now 4,000)."""
    made = sqlite_backends(max_bytes=64_000)
    for i in range(64):
        await made.set(f"f{i:03}", b"x" * 996, None)  # 1,000 bytes each: full
    readings = 0
    count = made._count

    async def counted() -> None:
        nonlocal readings
        readings += 1
        await count()

    monkeypatch.setattr(made, "_count", counted)
    for i in range(64):
        await made.set(f"n{i:03}", b"x" * 996, None)
    assert readings <= 64 // 4 + 1  # a sixteenth of the bound is 4 stores
    assert made.stats().evictions >= 64 and _stored(sqlite_path)[1] <= 64_000


async def test_sqlite_concurrent_stores_of_one_key_count_it_once(
    sqlite_backends: Any, sqlite_path: Path
) -> None:
    made = sqlite_backends(max_bytes=0)
    async with anyio.create_task_group() as tg:
        for size in (100, 100, 50, 100):
            tg.start_soon(made.set, "k", b"v" * size, None)
    stats = made.stats()
    assert (stats.entries, stats.bytes) == _stored(sqlite_path)
    assert stats.entries == 1
    await made.set("k", b"v" * 10, None)  # and an overwrite, one after the other
    assert (made.stats().entries, made.stats().bytes) == _stored(sqlite_path) == (1, 11)


async def test_sqlite_lookup_of_an_expired_entry_keeps_a_fresh_one_stored_meanwhile(
    sqlite_backends: Any, sqlite_path: Path, clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the lookup reading the expired row and deleting it, another worker stores
    a fresh answer under the key: the delete leaves it, and counts no expiry."""
    made = sqlite_backends(max_bytes=0, clock=clock)
    other = sqlite_backends(max_bytes=0, clock=clock)
    await made.set("k", b"old", 10)
    clock.advance(20)
    assert made._db is not None
    read = made._db.execute_fetchall

    async def read_then_other_stores(sql: str, parameters: Any = None) -> Any:
        rows = await read(sql, parameters)
        if sql.startswith("UPDATE"):
            await other.set("k", b"fresh", 100)
        return rows

    monkeypatch.setattr(made._db, "execute_fetchall", read_then_other_stores)
    assert await made.get("k") is None  # it read the expired answer
    monkeypatch.undo()
    assert await made.get("k") == b"fresh"
    assert made.stats().expirations == 0
    clock.advance(200)
    assert await made.get("k") is None  # a real expiry still counts
    assert made.stats().expirations == 1 and _stored(sqlite_path) == (0, 0)


async def test_sqlite_a_row_of_other_types_is_a_miss_and_dropped(
    sqlite_backends: Any, sqlite_path: Path
) -> None:
    """A row this cache never writes (a TEXT value, an expiry that is no number): raising,
    the lookup left the whole backend alone for 5 s each time the key was asked for."""
    made = sqlite_backends(max_bytes=0)
    await made.set("good", b"fine", 60)
    for column, value in (("value", "text"), ("expires_at", "soon")):
        await made.set("bad", b"answer", 60)
        with sqlite3.connect(sqlite_path) as db:
            db.execute(f"UPDATE llmrouter_cache SET {column} = ? WHERE key = 'bad'", (value,))
        assert await made.get("bad") is None
        assert await made.get("good") == b"fine"
        assert _stored(sqlite_path) == (made.stats().entries, made.stats().bytes) == (1, 8)


async def test_sqlite_a_path_it_cannot_use_names_the_setting(tmp_path: Path) -> None:
    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_text("x" * 300)
    # Under a file (no directory can be made there), a directory, a file of another kind.
    for path in (not_a_database / "cache.db", tmp_path, not_a_database):
        made = SQLiteBackend(path)
        with pytest.raises(ConfigError) as caught:
            await made.start()
        assert f"cache.sqlite_path {str(path)!r}" in caught.value.message
        await made.aclose()


def test_sqlite_table_name_must_be_an_identifier(sqlite_path: Path) -> None:
    with pytest.raises(ConfigError, match="sqlite_table"):
        SQLiteBackend(sqlite_path, table="x; DROP TABLE ledger")


@pytest.mark.redis
async def test_redis_sets_ttl_and_keeps_to_its_prefix(redis_prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        made = RedisBackend(prefix=redis_prefix, client=client)
        await made.set("a", b"1", 30)
        await made.set("b", b"2", None)
        pttl = await client.pttl(redis_prefix + "a")
        assert 0 < pttl <= 30_000
        assert await client.pttl(redis_prefix + "b") == -1  # no expiry
        other = redis_prefix[:-1] + "-other:a"
        await client.set(other, b"not ours")
        assert await made.clear() == 2
        assert await client.get(other) == b"not ours"
        await client.delete(other)
        await made.aclose()  # an injected client stays open
        assert await client.ping()
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_redis_a_key_of_another_type_is_a_miss_and_dropped(redis_prefix: str) -> None:
    """GET on a hash raises WRONGTYPE: raising, the lookup left the whole backend alone
    for 5 s each time the key was asked for, and the answer was never stored over it."""
    from redis.asyncio import Redis

    client = Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        made = RedisBackend(prefix=redis_prefix, client=client)
        await client.hset(redis_prefix + "bad", "field", "value")
        assert await made.get("bad") is None
        assert await client.exists(redis_prefix + "bad") == 0
        await made.set("bad", b"answer", 60)
        assert await made.get("bad") == b"answer"
    finally:
        await client.delete(redis_prefix + "bad")
        await client.aclose()


@pytest.mark.redis
async def test_redis_more_concurrent_commands_than_connections_wait_for_one(redis_prefix: str) -> None:
    made = RedisBackend(prefix=redis_prefix)  # at most MAX_CONNECTIONS (100) connections
    got: list[bytes | None] = []

    async def one(i: int) -> None:
        await made.set(f"k{i}", b"v", 30)
        got.append(await made.get(f"k{i}"))

    try:
        async with anyio.create_task_group() as tg:
            for i in range(300):
                tg.start_soon(one, i)
        assert got == [b"v"] * 300
    finally:
        await made.clear()
        await made.aclose()


@pytest.mark.redis
async def test_redis_entry_really_expires(redis_prefix: str) -> None:
    made = RedisBackend(prefix=redis_prefix)
    await made.set("brief", b"x", 0.05)
    for _ in range(200):  # bounded wait for Redis to expire it
        if await made.get("brief") is None:
            break
        await anyio.sleep(0.02)
    assert await made.get("brief") is None
    await made.aclose()


@pytest.mark.redis
async def test_redis_replicas_share_entries(redis_prefix: str) -> None:
    first, second = RedisBackend(prefix=redis_prefix), RedisBackend(prefix=redis_prefix)
    await first.set("shared", b"answer", 60)
    assert await second.get("shared") == b"answer"
    await first.clear()
    await first.aclose()
    await second.aclose()


async def test_unreachable_redis_raises_quickly_instead_of_hanging() -> None:
    made = RedisBackend("redis://127.0.0.1:1/0", timeout=0.5)
    with anyio.fail_after(10):  # generous bound: the point is that it does not hang
        with pytest.raises(Exception):  # noqa: B017 - redis' ConnectionError
            await made.get("k")
    await made.aclose()


def test_build_backend_from_config(sqlite_path: Path) -> None:
    assert build_backend(CacheConfig(backend="none")) is None
    assert isinstance(build_backend(CacheConfig()), MemoryBackend)
    made = build_backend(CacheConfig(backend="sqlite", sqlite_path=str(sqlite_path)))
    assert isinstance(made, SQLiteBackend) and made.path == str(sqlite_path)
    made = build_backend(CacheConfig(backend="redis", redis_prefix="p:"))
    assert isinstance(made, RedisBackend) and made.prefix == "p:"


async def test_sqlite_concurrent_first_use_opens_once(sqlite_path: Path) -> None:
    made = SQLiteBackend(sqlite_path)
    opened: list[Any] = []

    async def first_use() -> None:
        await made.get("k")
        opened.append(made._db)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(first_use)
    assert len({id(db) for db in opened}) == 1
    await made.aclose()


def test_importing_the_cache_pulls_no_backend_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, llmrouter, llmrouter.cache, llmrouter.cache.extension;"
        "print(sorted(m for m in ('redis', 'aiosqlite', 'litestar', 'sqlalchemy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


_HAMMER = """
import asyncio, random, sys, time
from llmrouter.cache.sqlite import SQLiteBackend

async def main(path: str, seconds: float) -> None:
    backend = SQLiteBackend(path)
    await backend.start()
    errors: dict[str, int] = {}
    end = time.monotonic() + seconds

    async def task(seed: int) -> None:
        pick = random.Random(seed)
        while time.monotonic() < end:
            key = f"k{pick.randrange(50)}"
            try:
                if pick.random() < 0.3:
                    await backend.set(key, b"v" * 300, 60)
                else:
                    await backend.get(key)
            except Exception as exc:
                errors[str(exc)] = errors.get(str(exc), 0) + 1

    await asyncio.gather(*(task(seed) for seed in range(16)))
    await backend.aclose()
    print(errors)

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


def test_sqlite_shared_by_two_processes_never_locks(sqlite_path: Path) -> None:
    """Two worker processes on one file, 16 tasks each, reading and storing the same keys:
    no operation fails with ``database is locked`` (over half of one process's did when
    a write's implicit transaction spanned other tasks' statements)."""
    import subprocess
    import sys

    command = [sys.executable, "-c", _HAMMER, str(sqlite_path), "1.5"]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=60)[0].strip() for worker in workers]
    assert outputs == ["{}", "{}"]
