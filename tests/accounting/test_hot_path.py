"""What the accounting work of every request does without its former costs: a secret
verified once is compared, not hashed again; the UTC day from its bounds; journal lines
through one buffer; admission without limits, budgets or an allow-list to check."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from llmrouter.accounting import Accounting, entry, keys
from llmrouter.accounting.config import LimitsConfig
from llmrouter.accounting.entry import LedgerEntry, utc_day
from llmrouter.accounting.extension import AccountingExtension
from llmrouter.accounting.in_flight import in_flight
from llmrouter.accounting.journal import _LINE_KEPT, Journal, orphaned_rows, release_orphan
from llmrouter.context import RequestContext
from llmrouter.errors import AuthenticationError

from .conftest import chat_context, finish

pytestmark = pytest.mark.anyio


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The secrets hashed to be verified."""
    hashed: list[str] = []
    real = keys.hash_secret

    def counting(secret: str) -> str:
        hashed.append(secret)
        return real(secret)

    monkeypatch.setattr(keys, "hash_secret", counting)
    return hashed


async def test_a_verified_secret_is_compared_not_hashed_again(acct: Accounting, hashes: list[str]) -> None:
    key, secret = await acct.keys.create("alice")
    hashes.clear()  # the one stored
    for _ in range(3):
        assert (await acct.authenticate(secret)).id == key.id
    assert hashes == [secret]
    # The same secret as another string object (each request's header is one): still known.
    assert (await acct.authenticate("".join(list(secret)))).id == key.id
    assert len(hashes) == 1


async def test_a_wrong_secret_of_a_known_prefix_is_still_hashed_and_refused(
    acct: Accounting, hashes: list[str]
) -> None:
    _key, secret = await acct.keys.create("bob")
    hashes.clear()
    await acct.authenticate(secret)
    public = secret[: len(keys.SECRET_PREFIX) + 9]  # sk-llmr-<prefix>-
    for wrong in (
        secret[:-1] + ("a" if secret[-1] != "a" else "b"),
        secret + "x",
        public + "x",
        public + "é" * 43,
    ):
        with pytest.raises(AuthenticationError, match="unknown API key"):
            await acct.authenticate(wrong)
    assert len(hashes) == 5  # the right one once, each wrong one
    assert (await acct.authenticate(secret)).name == "bob"  # and the right one is still known
    assert len(hashes) == 5


async def test_malformed_secrets_are_refused_as_before(acct: Accounting) -> None:
    _key, secret = await acct.keys.create("carol")
    await acct.authenticate(secret)
    prefix = secret[8:16]
    for bad in ("", "sk-llmr-", f"sk-llmr-{prefix}", f"sk-llmr-{prefix}-", f"xx-llmr-{prefix}-{secret[17:]}"):
        with pytest.raises(AuthenticationError, match="invalid API key format"):
            await acct.authenticate(bad)


async def test_a_revoked_or_rotated_key_forgets_its_secret(acct: Accounting, hashes: list[str]) -> None:
    key, secret = await acct.keys.create("dave")
    hashes.clear()
    await acct.authenticate(secret)
    await acct.keys.revoke(key.id)
    with pytest.raises(AuthenticationError, match="revoked") as info:
        await acct.authenticate(secret)
    assert info.value.code == "key_revoked"
    assert len(hashes) == 2  # read and hashed again after the revocation

    other, old = await acct.keys.create("erin")
    await acct.authenticate(old)
    _rotated, new = await acct.keys.rotate(other.id)
    with pytest.raises(AuthenticationError, match="unknown API key"):
        await acct.authenticate(old)
    assert (await acct.authenticate(new)).id == other.id


async def test_a_forgotten_key_is_read_and_hashed_again(acct: Accounting, hashes: list[str]) -> None:
    _key, secret = await acct.keys.create("frank")
    hashes.clear()
    await acct.authenticate(secret)
    acct.keys.forget()  # another replica changed it (key events), or every key
    await acct.authenticate(secret)
    assert hashes == [secret, secret]


async def test_a_stale_key_is_read_and_hashed_again(acct: Accounting, hashes: list[str]) -> None:
    _key, secret = await acct.keys.create("gina")
    hashes.clear()
    acct.keys._cache_seconds = 0.0  # every request reads its key
    for _ in range(3):
        await acct.authenticate(secret)
    assert len(hashes) == 3


async def test_an_expired_key_is_refused_though_its_secret_is_known(
    acct: Accounting, monkeypatch: pytest.MonkeyPatch
) -> None:
    expires_at = 4_000_000_000.0
    _key, secret = await acct.keys.create("hugo", expires_at=expires_at)
    principal = await acct.authenticate(secret)
    monkeypatch.setattr(keys.time, "time", lambda: expires_at + 1)
    with pytest.raises(AuthenticationError, match="expired") as info:
        await acct.authenticate(secret)
    assert info.value.code == "key_expired"
    with pytest.raises(AuthenticationError, match="expired"):
        await acct.hooks.before_request(chat_context(principal))


async def test_auth_auto_answers_from_a_known_key_without_counting(acct: Accounting) -> None:
    assert not acct.keys.any_known and not await acct.auth_required()
    await acct.keys.create("ivy")
    assert acct.keys.any_known and await acct.auth_required()

    async def down() -> bool:
        raise ConnectionError("the database")

    acct.keys.any_exist = down
    assert await acct.auth_required()  # known for good: no count


async def test_the_extension_attaches_a_known_key_and_refuses_a_bad_one(acct: Accounting) -> None:
    key, secret = await acct.keys.create("jack")
    extension = AccountingExtension(acct)
    for _ in range(2):
        ctx = RequestContext()
        await extension.authenticate(ctx, {"authorization": f"Bearer  {secret} "})
        assert ctx.principal == key and ctx.api_key_id == key.id
    ctx = RequestContext()
    await extension.authenticate(ctx, {"x-api-key": secret})
    assert ctx.api_key_id == key.id
    with pytest.raises(AuthenticationError) as info:
        await extension.authenticate(RequestContext(), {"authorization": "Bearer  "})
    assert info.value.code == "missing_api_key"
    with pytest.raises(AuthenticationError, match="unknown API key"):
        await extension.authenticate(RequestContext(), {"authorization": f"Bearer {secret}\x01"})


def test_the_utc_day_is_the_day_its_number_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The day is found by comparing with the bounds of the one last formatted; at the
    bounds too, it is day number ``ts // 86400`` since 1970-01-01 (a day's last
    half-microsecond was once rounded into the next day, and the whole day cached so)."""

    def by_number(ts: float) -> str:
        return (date(1970, 1, 1) + timedelta(days=int(ts // 86400))).isoformat()

    monkeypatch.setattr(entry, "_last_day", (0.0, 0.0, ""))
    midnight = datetime(2026, 12, 6, tzinfo=UTC).timestamp()
    before = math.nextafter(midnight, 0.0)
    cases = [midnight - 3600, before, midnight, before, midnight + 86399.999999, midnight + 86400.0, 5.0]
    cases += [-1.0, 0.0, midnight + 1, math.nextafter(midnight + 86400.0, 0.0)]
    rng = random.Random(7)
    cases += [rng.uniform(-1e9, 4e9) for _ in range(1000)]
    cases += sorted(rng.uniform(midnight - 86400 * 3, midnight + 86400 * 3) for _ in range(1000))
    for ts in cases:
        assert utc_day(ts) == by_number(ts), ts
    for bad in (math.nan, math.inf):
        with pytest.raises((ValueError, OverflowError)):
            utc_day(bad)


def _row(i: int, pad: str = "") -> LedgerEntry:
    return LedgerEntry(f"{i:032x}", f"req-{i}{pad}", 1.5 + i, "2026-12-06", prompt_tokens=i)


def test_journal_lines_through_one_buffer_read_back_as_written(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=4096)
    ctx = finish(chat_context(None))
    written: list[Any] = []
    for i in range(60):
        # Long and short lines in turn, an in-flight array among them, one longer than
        # the buffer kept and one longer than a segment.
        pad = "x" * (_LINE_KEPT + 10 if i == 20 else 5000 if i == 30 else (i * 37) % 300)
        row = _row(i, pad)
        journal.append(row)
        written.append(json.loads(json.dumps({f: getattr(row, f) for f in row.__struct_fields__})))
        if i % 7 == 0:
            line = in_flight(ctx, f"{i:032x}", {"held": [i]})
            journal.append(line)
            written.append(json.loads(json.dumps([getattr(line, f) for f in line.__struct_fields__])))
    assert len(journal._line) <= _LINE_KEPT
    journal.close(committed=False)
    ((folder, rows, fd),) = orphaned_rows(tmp_path)
    release_orphan(folder, fd, replayed=True)
    assert rows == written


def test_a_line_that_cannot_be_encoded_leaves_the_next_ones_whole(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(_row(1, "y" * 200))
    with pytest.raises(TypeError):
        journal.append({"bad": object()})
    journal.append(_row(2))
    journal.close(committed=False)
    ((folder, rows, fd),) = orphaned_rows(tmp_path)
    release_orphan(folder, fd, replayed=True)
    assert [row["entry_id"] for row in rows] == [f"{1:032x}", f"{2:032x}"]


async def test_admission_without_limits_takes_nothing_and_with_them_takes_tickets(acct: Accounting) -> None:
    key, _ = await acct.keys.create("kim")
    ctx = chat_context(key)
    await acct.hooks.before_request(ctx)
    (admission,) = acct.hooks._admitted.values()
    assert admission.tickets == () and admission.reservation is None and admission.entry_id is not None
    await acct.hooks.after_request(finish(ctx))
    assert not acct.hooks._admitted

    limited, _ = await acct.keys.create("lee", rpm=5)
    ctx = chat_context(limited)
    await acct.hooks.before_request(ctx)
    assert [t.subject for t in acct.hooks._admitted[id(ctx)].tickets] == [limited.id]
    assert ctx.extra_headers and ctx.extra_headers["x-ratelimit-limit-requests"] == "5"
    await acct.hooks.after_request(finish(ctx))

    acct.hooks.limits = LimitsConfig(rpm=7)  # defaults for keys without their own
    ctx = chat_context(key)
    await acct.hooks.before_request(ctx)
    assert [t.limits.rpm for t in acct.hooks._admitted[id(ctx)].tickets] == [7]
    await acct.hooks.after_request(finish(ctx))
    await acct.ledger.flush()
    rows = await acct.usage(by=["status"])
    assert {r["status"]: r["requests"] for r in rows} == {"ok": 3}


def test_a_cached_key_shows_neither_its_secret_nor_its_hash() -> None:
    cached = keys._Cached(1.0, None, "hash-of-it", "sk-llmr-abcdefgh-secret")  # type: ignore[arg-type]
    assert "secret" not in repr(cached) and "hash-of-it" not in repr(cached)
