"""Changing a key after it was made: its fields (``KeyStore.update``), its secret
(``rotate``), and what its budget counts when the budget is changed."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import text

from llmrouter.accounting import Accounting
from llmrouter.accounting.config import AccountingConfig, AuthConfig, RedisConfig
from llmrouter.accounting.key_events import RedisKeyEvents
from llmrouter.accounting.keys import ApiKey, KeyStore
from llmrouter.errors import AuthenticationError, BudgetExceededError, InvalidRequestError, NotFoundError

from .conftest import (
    REDIS_URL,
    _redis_client,
    chat_context,
    finish,
    make_config,
    needs_pg,
    needs_redis,
    redis_config,
)

pytestmark = pytest.mark.anyio

COST = 0.4


async def test_update_changes_fields_and_keeps_the_key(acct: Accounting) -> None:
    key, secret = await acct.keys.create("team", allowed_models=["gpt-4o"], rpm=10, note="first")
    assert (await acct.authenticate(secret)).rpm == 10  # now cached on this replica
    changed = await acct.keys.update(
        "team", {"name": "team-2", "rpm": 20, "tpm": 1000, "allowed_models": None, "scopes": ["admin"]}
    )
    assert (changed.id, changed.prefix, changed.name) == (key.id, key.prefix, "team-2")
    seen = await acct.authenticate(secret)  # the same secret, the new fields at once
    assert (seen.rpm, seen.tpm, seen.allowed_models, seen.scopes, seen.note) == (
        20,
        1000,
        None,
        ("admin",),
        "first",
    )
    assert await acct.keys.update(key.id, {}) == changed  # nothing to change: nothing written
    cleared = await acct.keys.update(key.id, {"rpm": None, "note": None, "expires_at": time.time() + 60})
    assert (cleared.rpm, cleared.note, cleared.tpm) == (None, None, 1000)
    assert cleared.expires_at is not None and cleared.state() == "active"


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"rpm": 0}, "rpm"),
        ({"name": ""}, "name"),
        ({"scopes": []}, "scopes"),
        ({"scopes": ["root"]}, "scopes"),
        ({"budget": -1.0}, "budget"),
        ({"budget_period": "day"}, "budget_period"),  # the key has no budget
        ({"budget": 1.0, "budget_period": "week"}, "budget_period"),
        ({"allowed_models": ["a,b"]}, "allowed_models"),
        ({"expires_at": float("nan")}, "expires_at"),
        ({"secret_hash": "0" * 64}, "secret_hash"),
        ({"revoked_at": None}, "revoked_at"),
    ],
)
async def test_update_refuses_what_cannot_be_stored(
    acct: Accounting, changes: dict[str, Any], param: str
) -> None:
    key, secret = await acct.keys.create("strict", rpm=5)
    with pytest.raises(InvalidRequestError) as info:
        await acct.keys.update(key.id, changes)
    assert info.value.param == param and info.value.http_status == 400
    assert (await acct.authenticate(secret)).rpm == 5  # nothing changed


async def test_a_revoked_or_unknown_key_cannot_be_changed(acct: Accounting) -> None:
    key, _ = await acct.keys.create("gone")
    await acct.keys.revoke(key.id)
    for change in (acct.keys.update(key.id, {"rpm": 5}), acct.keys.rotate(key.id)):
        with pytest.raises(InvalidRequestError) as info:
            await change
        assert (info.value.http_status, info.value.code) == (409, "key_revoked")
    with pytest.raises(NotFoundError):
        await acct.keys.update("nobody", {"rpm": 5})
    with pytest.raises(NotFoundError):
        await acct.keys.rotate("nobody")


async def test_rotate_gives_the_same_key_a_new_secret(acct: Accounting) -> None:
    key, old = await acct.keys.create("rotated", budget=5.0, rpm=7)
    assert (await acct.authenticate(old)).id == key.id  # cached on this replica
    rotated, new = await acct.keys.rotate("rotated")
    assert new != old and rotated.prefix != key.prefix and new.startswith(f"sk-llmr-{rotated.prefix}-")
    assert (rotated.id, rotated.name, rotated.budget, rotated.rpm) == (key.id, "rotated", 5.0, 7)
    assert (await acct.authenticate(new)).id == key.id
    with pytest.raises(AuthenticationError):
        await acct.authenticate(old)  # at once on this replica
    assert (await acct.keys.get(key.prefix)) is None  # the old prefix finds nothing


async def test_another_replica_sees_changes_after_its_cache(sqlite_url: str, tmp_path: Path) -> None:
    async with Accounting(make_config(sqlite_url, tmp_path)) as one:
        other = KeyStore(one.engine, cache_seconds=0.0)  # a second replica's view
        _, secret = await one.keys.create("shared", rpm=1)
        assert (await other.verify(secret)).rpm == 1
        await one.keys.update("shared", {"rpm": 100})
        assert (await other.verify(secret)).rpm == 100
        _, new = await one.keys.rotate("shared")
        with pytest.raises(AuthenticationError):
            await other.verify(secret)
        assert (await other.verify(new)).rpm == 100


async def _spend(acct: Accounting, key: ApiKey, cost: float) -> None:
    ctx = chat_context(key, max_cost=cost)
    await acct.hooks.before_request(ctx)
    await acct.hooks.after_request(finish(ctx, cost=cost))


async def _current(acct: Accounting, key: ApiKey) -> ApiKey:
    found = await acct.keys.get(key.id)
    assert found is not None
    return found


async def test_a_budget_set_again_counts_what_was_spent_without_it(
    sqlite_url: str, tmp_path: Path, shared_backend: tuple[str, Any]
) -> None:
    """A month budget of $1 with $0.40 spent, dropped while $0.40 more is spent, then set
    again: the month has spent $0.80, so a request that may cost $0.40 more is refused.
    Counting on from the window's old counter ($0.40) let it pass."""
    backend, redis = shared_backend
    extra = {"redis": redis_config(redis)} if redis is not None else {}
    config = make_config(sqlite_url, tmp_path, budget_backend=backend, **extra)
    async with Accounting(config, redis=redis) as acct:
        key, _ = await acct.keys.create("team", budget=1.0)
        await _spend(acct, key, COST)
        key = await acct.keys.update(key.id, {"budget": None})
        await _spend(acct, key, COST)
        key = await acct.keys.update(key.id, {"budget": 1.0})
        assert key.budget_version == 1
        with pytest.raises(BudgetExceededError):
            await acct.hooks.before_request(chat_context(key, max_cost=COST))
        # Raising the amount keeps counting in the same window: $1.20 of $2 spent after one more.
        key = await acct.keys.update(key.id, {"budget": 2.0})
        assert key.budget_version == 1
        await _spend(acct, key, COST)
        with pytest.raises(BudgetExceededError):
            await acct.hooks.before_request(chat_context(key, max_cost=2 * COST + 0.01))
        [status] = await acct.budgets.status(key)
        assert status["spent"] == pytest.approx(3 * COST) and status["limit"] == 2.0


async def test_a_budget_back_on_an_earlier_period_counts_what_was_spent_meanwhile(acct: Accounting) -> None:
    key, _ = await acct.keys.create("team", budget=1.0, budget_period="month")
    await _spend(acct, key, COST)
    key = await acct.keys.update(key.id, {"budget_period": "day"})
    await _spend(acct, key, COST)  # counted in the day's window
    key = await acct.keys.update(key.id, {"budget_period": "month"})
    assert key.budget_version == 2
    with pytest.raises(BudgetExceededError):
        await acct.hooks.before_request(chat_context(await _current(acct, key), max_cost=COST))


async def test_concurrent_updates_of_different_fields_both_land(acct: Accounting) -> None:
    key, _ = await acct.keys.create("busy", budget=1.0)
    await asyncio.gather(
        acct.keys.update(key.id, {"rpm": 5}),
        acct.keys.update(key.id, {"note": "raised"}),
        acct.keys.update(key.id, {"budget_period": "day"}),
        acct.keys.update(key.id, {"tpm": 900}),
    )
    now = await _current(acct, key)
    assert (now.rpm, now.note, now.budget_period, now.tpm, now.budget) == (5, "raised", "day", 900, 1.0)
    assert now.budget_version == 1


async def test_keys_are_listed_a_page_at_a_time(acct: Accounting) -> None:
    made = [(await acct.keys.create(f"k{i}"))[0] for i in range(7)]
    await acct.keys.revoke("k3")
    async with acct.engine.begin() as conn:  # made in the same instant: the id orders them
        await conn.execute(text("UPDATE llmr_api_keys SET created_at = 1.0 WHERE name IN ('k4', 'k5', 'k6')"))
    seen: list[str] = []
    after = None
    while True:
        page = await acct.keys.list(limit=2, after=after)
        seen += [k.id for k in page]
        if len(page) < 2:
            break
        after = page[-1].id
    assert sorted(seen) == sorted(k.id for k in made) and len(seen) == 7
    assert "k3" not in [k.name for k in await acct.keys.list(include_revoked=False)]
    with pytest.raises(InvalidRequestError) as info:
        await acct.keys.list(after="key_nosuchkey")
    assert info.value.param == "after"


@pytest.fixture(params=[pytest.param("redis", marks=needs_redis), pytest.param("postgres", marks=needs_pg)])
async def shared_config(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AccountingConfig]:
    """Replicas sharing their key changes through Redis (on SQLite), or PostgreSQL alone;
    each trusts its copy of a key for 300 s."""
    auth = AuthConfig(cache_seconds=300.0)
    if request.param == "postgres":
        yield make_config(request.getfixturevalue("pg_url"), tmp_path, auth=auth)
        return
    async with _redis_client() as client:
        redis = RedisConfig(url=REDIS_URL, prefix=client.test_prefix)
        yield make_config(f"sqlite+aiosqlite:///{tmp_path / 'acct.db'}", tmp_path, redis=redis, auth=auth)


async def test_other_replicas_see_key_changes_at_once(shared_config: AccountingConfig) -> None:
    """A revocation, an update and a rotation reach every replica's cache at once."""
    async with Accounting(shared_config) as one, Accounting(shared_config) as two:
        await anyio.sleep(0.3)  # both following
        key, secret = await one.keys.create("shared", rpm=1)
        assert (await two.authenticate(secret)).rpm == 1  # two's copy, trusted for 300 s
        await one.keys.update(key.id, {"rpm": 50})
        await _soon(two, secret, lambda seen: seen is not None and seen.rpm == 50)
        _, new = await one.keys.rotate(key.id)
        await _soon(two, secret, lambda seen: seen is None)  # the old secret
        assert (await two.authenticate(new)).rpm == 50
        await one.keys.revoke(key.id)
        await _soon(two, new, lambda seen: seen is None)


async def _soon(acct: Accounting, secret: str, check: Any) -> None:
    """Wait up to 2 s for ``check`` to hold of what ``acct`` makes of ``secret`` (its key,
    or None when refused)."""
    with anyio.fail_after(2):
        while True:
            try:
                seen = await acct.authenticate(secret)
            except AuthenticationError:
                seen = None
            if check(seen):
                return
            await anyio.sleep(0.02)


async def test_a_failed_publication_does_not_fail_the_change(
    acct: Accounting, caplog: pytest.LogCaptureFixture
) -> None:
    class DownRedis:
        async def publish(self, channel: str, message: str) -> int:
            raise ConnectionError("Redis is down")

    events = RedisKeyEvents(DownRedis(), prefix="t:", forget=acct.keys.forget)
    acct.keys.on_change = events.publish
    key, _ = await acct.keys.create("quiet")
    assert (await acct.keys.update(key.id, {"rpm": 3})).rpm == 3
    assert "telling other replicas that key" in caplog.text and "auth.cache_seconds" in caplog.text


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_redis)])
async def test_a_key_revoked_from_the_command_line_is_refused_by_running_replicas_at_once(
    tmp_path: Path, redis_prefix: str, _: int
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'acct.db'}"
    (tmp_path / "llmrouter.yaml").write_text(
        f"accounting:\n  database: {{url: '{database}'}}\n"
        f"  redis: {{url: '{REDIS_URL}', prefix: '{redis_prefix}'}}\n"
    )
    config = make_config(
        database,
        tmp_path,
        redis=RedisConfig(url=REDIS_URL, prefix=redis_prefix),
        auth=AuthConfig(cache_seconds=300.0),
    )
    async with Accounting(config) as running:
        _, secret = await running.keys.create("leaked")
        await running.authenticate(secret)  # trusted for 300 s
        done = await anyio.run_process(
            [
                sys.executable,
                "-m",
                "llmrouter.cli",
                "keys",
                "revoke",
                "leaked",
                "--config",
                str(tmp_path / "llmrouter.yaml"),
            ],
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        await _soon(running, secret, lambda seen: seen is None)


async def test_following_key_changes_survives_an_unreachable_redis(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listens: one warning, retries with backoff, and closing stops it at once."""
    from llmrouter.redis_pool import connect

    listener = connect("redis://127.0.0.1:1/0", timeout=0.5, max_connections=1)
    events = RedisKeyEvents(listener, prefix="t:", forget=lambda prefix: None, listener=listener)
    events.start()
    await anyio.sleep(2.0)  # tries at 0, 0.5 and 1.5 s
    with anyio.fail_after(1):
        await events.aclose()
    warnings = [r for r in caplog.records if "following key changes failed" in r.getMessage()]
    assert len(warnings) == 1 and "auth.cache_seconds" in warnings[0].getMessage()


async def test_a_read_that_crossed_a_change_is_not_trusted(sqlite_url: str, tmp_path: Path) -> None:
    """A replica reading a key while another changes it may read the row as it was: the
    change's message arrives during the read, and the read must not then be cached for
    ``auth.cache_seconds``."""
    from sqlalchemy import event

    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        key, secret = await acct.keys.create("racing")
        store = KeyStore(acct.engine, cache_seconds=300.0)  # another replica's view
        reads: list[str] = []

        def change_arrives(conn: object, cursor: object, statement: str, *args: object) -> None:
            if "llmr_api_keys" in statement and statement.lstrip().upper().startswith("SELECT"):
                reads.append(statement)
                if len(reads) == 1:
                    store.forget(key.prefix)  # as KeyEvents does on a message

        event.listen(acct.engine.sync_engine, "before_cursor_execute", change_arrives)
        try:
            await store.verify(secret)  # read while the change arrived: answered, not kept
            await store.verify(secret)  # so read again
            await store.verify(secret)  # now kept
        finally:
            event.remove(acct.engine.sync_engine, "before_cursor_execute", change_arrives)
        assert len(reads) == 2


async def test_following_again_after_a_failure_forgets_every_key() -> None:
    """Changes published while the subscription was down were missed: every cached key
    is dropped when it is back."""
    forgotten: list[str | None] = []
    attempts = 0

    class PubSub:
        async def subscribe(self, channel: str) -> None:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise ConnectionError("Redis restarting")

        async def get_message(self, **kwargs: Any) -> dict[str, Any] | None:
            await anyio.sleep(0.05)
            return {"data": b"abcd1234"} if len(forgotten) == 1 else None

        async def aclose(self) -> None:
            pass

    class Listener:
        def pubsub(self) -> PubSub:
            return PubSub()

        async def aclose(self) -> None:
            pass

    events = RedisKeyEvents(Listener(), prefix="t:", forget=forgotten.append, listener=Listener())
    events.start()
    await anyio.sleep(0.8)  # fails, waits 0.5 s, subscribes again
    await events.aclose()
    assert attempts == 2 and forgotten[:2] == [None, "abcd1234"]
