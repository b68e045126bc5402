"""API key lifecycle: create (secret once, hash stored), verify, scopes, models, expiry, revoke."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from sqlalchemy import event, text

from llmrouter.accounting import Accounting
from llmrouter.accounting.keys import KeyStore, parse_secret
from llmrouter.errors import AuthenticationError, InvalidRequestError, NotFoundError, PermissionDeniedError

from .conftest import chat_context, finish, make_config

pytestmark = pytest.mark.anyio


async def test_secret_is_shown_once_and_stored_only_as_hash(db_url: str, tmp_path: Path) -> None:
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        key, secret = await acct.keys.create("alice", scopes=["user"])
        assert secret.startswith(f"sk-llmr-{key.prefix}-") and len(secret) > 50
        assert parse_secret(secret) == key.prefix
        async with acct.engine.connect() as conn:
            row = (await conn.execute(text("SELECT * FROM llmr_api_keys"))).mappings().one()
        assert secret not in {str(v) for v in row.values()}
        assert row["secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
        assert (await acct.authenticate(secret)).id == key.id
        listed = await acct.keys.list()
        assert [k.id for k in listed] == [key.id]
        assert "secret" not in type(listed[0]).__struct_fields__


async def test_wrong_malformed_and_unknown_secrets_are_refused(acct: Accounting) -> None:
    _key, secret = await acct.keys.create("bob")
    tampered = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for bad in (tampered, "sk-llmr-zzzzzzzz-" + "x" * 43, "sk-other", ""):
        with pytest.raises(AuthenticationError) as info:
            await acct.authenticate(bad)
        assert secret not in info.value.message and tampered not in info.value.message


def test_a_secret_whose_prefix_is_not_the_alphabet_is_malformed() -> None:
    assert parse_secret("sk-llmr-abcd1234-" + "x" * 43) == "abcd1234"
    for bad in ("sk-llmr-ab\x00d1234-xyz", "sk-llmr-ABCD1234-xyz", "sk-llmr-abc d123-xyz"):
        assert parse_secret(bad) is None


async def test_revoke_takes_effect_at_once_and_keeps_auth_on(acct: Accounting) -> None:
    assert not await acct.auth_required()
    _key, secret = await acct.keys.create("carol")
    assert await acct.auth_required()
    await acct.authenticate(secret)  # now cached
    revoked = await acct.keys.revoke("carol")
    assert revoked.state() == "revoked"
    with pytest.raises(AuthenticationError, match="revoked"):
        await acct.authenticate(secret)
    assert await acct.auth_required()  # revoking the last key must not open the service
    with pytest.raises(NotFoundError):
        await acct.keys.revoke("nobody")


async def test_a_repeated_name_stands_for_its_one_unrevoked_key(db_url: str, tmp_path: Path) -> None:
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        old, old_secret = await acct.keys.create("ci-bot")
        new, new_secret = await acct.keys.create("ci-bot")  # a rotation: both work for a while
        with pytest.raises(InvalidRequestError) as info:
            await acct.keys.revoke("ci-bot")
        assert info.value.http_status == 409 and info.value.code == "ambiguous_key"
        assert old.id in info.value.message and new.id in info.value.message
        assert (await acct.authenticate(old_secret)).id == old.id, "nothing was revoked"
        assert (await acct.authenticate(new_secret)).id == new.id
        await acct.keys.revoke(old.id)
        assert (await acct.keys.get("ci-bot")).id == new.id, "the one not revoked, though older ones exist"
        assert (await acct.keys.revoke("ci-bot")).id == new.id
        with pytest.raises(AuthenticationError, match="revoked"):
            await acct.authenticate(new_secret)
        assert (await acct.keys.get("ci-bot")).id == new.id, "all revoked: the newest"


async def test_a_key_is_found_by_id_then_prefix_then_name(db_url: str, tmp_path: Path) -> None:
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        target, _ = await acct.keys.create("target")
        # Names that spell another key's id or prefix do not shadow it, older or newer.
        await acct.keys.create(target.id)
        await acct.keys.create(target.prefix)
        assert (await acct.keys.get(target.id)).id == target.id
        assert (await acct.keys.get(target.prefix)).id == target.id
        assert (await acct.keys.get("target")).id == target.id
        assert await acct.keys.get("nobody") is None


async def test_revocation_seen_by_another_replica_after_cache_expiry(sqlite_url: str, tmp_path: Path) -> None:
    async with Accounting(make_config(sqlite_url, tmp_path)) as one:
        other = KeyStore(one.engine, cache_seconds=0.0)  # a second replica's view of the same database
        _, secret = await one.keys.create("dave")
        assert (await other.verify(secret)).name == "dave"
        await one.keys.revoke("dave")
        with pytest.raises(AuthenticationError):
            await other.verify(secret)


async def test_concurrent_auth_checks_share_one_query(sqlite_url: str, tmp_path: Path) -> None:
    """With auth ``auto`` and no key yet, the requests in flight together send one COUNT
    query between them, not one each (a "no key" answer is not kept: each batch counts)."""
    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        store = KeyStore(acct.engine, cache_seconds=0.2)
        queries: list[str] = []

        def count(conn: object, cursor: object, statement: str, *args: object) -> None:
            if "count(" in statement.lower() and "llmr_api_keys" in statement:
                queries.append(statement)

        event.listen(acct.engine.sync_engine, "before_cursor_execute", count)
        results: list[bool] = []

        async def check() -> None:
            results.append(await store.any_exist())

        try:
            for _ in range(2):  # a batch, then another: a "no" is not kept
                results.clear()
                async with anyio.create_task_group() as tg:
                    for _ in range(50):
                        tg.start_soon(check)
                assert results == [False] * 50
                await anyio.sleep(0.25)
            assert len(queries) == 2
            await acct.keys.create("erin")
            await anyio.sleep(0.25)
            assert await store.any_exist() and len(queries) == 3
        finally:
            event.remove(acct.engine.sync_engine, "before_cursor_execute", count)


async def test_expired_key_is_refused(acct: Accounting) -> None:
    _, secret = await acct.keys.create("eve", expires_at=time.time() - 1)
    with pytest.raises(AuthenticationError, match="expired"):
        await acct.authenticate(secret)


async def test_key_that_expires_after_authentication_is_refused_by_the_hook(
    acct: Accounting, monkeypatch: pytest.MonkeyPatch
) -> None:
    expires_at = time.time() + 60
    _key, secret = await acct.keys.create("frank", expires_at=expires_at)
    principal = await acct.authenticate(secret)
    await acct.hooks.before_request(ctx := chat_context(principal))
    await acct.hooks.after_request(finish(ctx))
    # A minute later, without waiting one (a sleep just past a short expiry failed on a
    # busy machine, where authenticating took longer than the key lived).
    monkeypatch.setattr("llmrouter.accounting.keys.time", SimpleNamespace(time=lambda: expires_at + 1))
    with pytest.raises(AuthenticationError, match="expired"):
        await acct.hooks.before_request(chat_context(principal))


async def test_allowed_models_with_globs(acct: Accounting) -> None:
    _key, secret = await acct.keys.create("gina", allowed_models=["gpt-4o-mini", "local-*"])
    principal = await acct.authenticate(secret)
    for model in ("gpt-4o-mini", "local-smol"):
        ctx = chat_context(principal, model=model)
        await acct.hooks.before_request(ctx)
        await acct.hooks.after_request(finish(ctx))
    with pytest.raises(PermissionDeniedError) as info:
        await acct.hooks.before_request(chat_context(principal, model="gpt-4o"))
    assert info.value.http_status == 403 and info.value.code == "model_not_allowed"


async def test_scopes(acct: Accounting) -> None:
    admin, _ = await acct.keys.create("root", scopes=["admin"])
    user, _ = await acct.keys.create("user")
    assert admin.has_scope("admin") and admin.has_scope("user")
    assert user.has_scope("user") and not user.has_scope("admin")
    with pytest.raises(InvalidRequestError):
        await acct.keys.create("bad", scopes=["superuser"])


async def test_library_user_can_pass_only_the_key_id(acct: Accounting) -> None:
    key, _ = await acct.keys.create("lib", allowed_models=["gpt-4o-mini"])
    ctx = chat_context(model="gpt-4o-mini")
    ctx.api_key_id = key.id
    await acct.hooks.before_request(ctx)
    assert ctx.principal.name == "lib"
    await acct.hooks.after_request(finish(ctx))
    stranger = chat_context(model="gpt-4o-mini")
    stranger.api_key_id = "key_doesnotexist"
    with pytest.raises(AuthenticationError):
        await acct.hooks.before_request(stranger)


async def test_a_key_named_by_id_is_refused_at_once_once_revoked_or_changed(acct: Accounting) -> None:
    """A library caller's ``RequestContext(api_key_id=...)`` goes through the key store's
    cache, which a change drops: the hooks' own cache kept admitting a revoked key, or
    one whose allowed models changed, for up to 5 s."""
    key, _ = await acct.keys.create("lib")

    def by_id(model: str = "gpt-4o") -> Any:
        ctx = chat_context(model=model)
        ctx.api_key_id = key.id
        return ctx

    ctx = by_id()
    await acct.hooks.before_request(ctx)
    await acct.hooks.after_request(finish(ctx))
    await acct.keys.update(key.id, {"allowed_models": ["gpt-4o-mini"]})
    with pytest.raises(PermissionDeniedError):
        await acct.hooks.before_request(by_id())
    await acct.keys.revoke(key.id)
    with pytest.raises(AuthenticationError, match="revoked"):
        await acct.hooks.before_request(by_id("gpt-4o-mini"))


async def test_a_key_loaded_by_id_is_read_again_when_another_replica_changes_it(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Another replica's change reaches this one as :meth:`KeyStore.forget` of the key's
    prefix (key events): it drops the key cached by id too. Until then it is cached."""
    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        key, _ = await acct.keys.create("lib")
        store = KeyStore(acct.engine, cache_seconds=60)
        assert (await store.load_cached(key.id)).revoked_at is None  # type: ignore[union-attr]
        await acct.keys.revoke(key.id)  # elsewhere: this store is not told
        assert (await store.load_cached(key.id)).revoked_at is None  # type: ignore[union-attr]
        store.forget(key.prefix)  # what the key event does
        assert (await store.load_cached(key.id)).revoked_at is not None  # type: ignore[union-attr]
        assert await store.load_cached("key_doesnotexist") is None


async def test_concurrent_verifies_of_one_key_share_one_query(sqlite_url: str, tmp_path: Path) -> None:
    """When a key's cached entry goes stale, the requests in flight with that key send one
    lookup between them; a cancelled one does not cancel it for the rest."""
    async with Accounting(make_config(sqlite_url, tmp_path)) as acct:
        key, secret = await acct.keys.create("frank")
        store = KeyStore(acct.engine, cache_seconds=0.2)
        queries: list[str] = []

        def lookup(conn: object, cursor: object, statement: str, *args: object) -> None:
            if "from llmr_api_keys" in statement.lower() and "prefix" in statement.lower():
                queries.append(statement)

        event.listen(acct.engine.sync_engine, "before_cursor_execute", lookup)
        found: list[str] = []

        async def check() -> None:
            found.append((await store.verify(secret)).id)

        try:
            for _ in range(2):  # the first lookup, then again once the entry went stale
                found.clear()
                async with anyio.create_task_group() as tg:
                    for _ in range(50):
                        tg.start_soon(check)
                    with anyio.move_on_after(0):  # one waiter gives up at once
                        await store.verify(secret)
                assert found == [key.id] * 50
                await anyio.sleep(0.25)
            assert len(queries) == 2
            with pytest.raises(AuthenticationError):
                await store.verify(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
        finally:
            event.remove(acct.engine.sync_engine, "before_cursor_execute", lookup)
