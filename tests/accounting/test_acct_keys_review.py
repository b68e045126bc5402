"""API keys and reports, after a review: the first key closes every worker at once, far
expiries, prefix references as listings show them, names with ``/``, and report output."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import event

from llmrouter.accounting import Accounting
from llmrouter.accounting.config import AuthConfig
from llmrouter.accounting.extension import AccountingExtension
from llmrouter.accounting.keys import MAX_EXPIRES_AT, KeyStore
from llmrouter.accounting.reports import render, report_columns, usage_report
from llmrouter.config import Config
from llmrouter.errors import InvalidRequestError, NotFoundError
from llmrouter.router import Router
from llmrouter.server import create_app

from .conftest import make_config

pytestmark = pytest.mark.anyio

SLOW_CACHE = AuthConfig(cache_seconds=60.0)  # what a negative answer was trusted for is long


def _worker(db_url: str, tmp_path: Path, name: str) -> Accounting:
    """One worker's accounting on the shared database (a journal of its own)."""
    return Accounting(make_config(db_url, tmp_path / name, auth=SLOW_CACHE))


def _app(acct: Accounting) -> Any:
    return create_app(Config(), router=Router(), extensions=[AccountingExtension(acct)])


class _Counts:
    """Counts the ``COUNT(*)`` queries an engine sends over the key table."""

    def __init__(self, acct: Accounting) -> None:
        self.engine = acct.engine.sync_engine
        self.seen = 0

    def __call__(self, conn: object, cursor: object, statement: str, *args: object) -> None:
        if "count(" in statement.lower() and "llmr_api_keys" in statement:
            self.seen += 1

    def __enter__(self) -> _Counts:
        event.listen(self.engine, "before_cursor_execute", self)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self)


async def test_the_first_key_closes_the_other_workers_at_once(db_url: str, tmp_path: Path) -> None:
    """With auth ``auto``, a worker that had seen no key cached that answer for
    ``cache_seconds``: after the first key was created on another worker, anonymous
    callers could still use it (and create admin keys) there."""
    async with _worker(db_url, tmp_path, "one") as one, _worker(db_url, tmp_path, "two") as two:
        assert not await two.auth_required()  # a fresh install: open
        await one.keys.create("owner", scopes=["admin"])
        assert await two.auth_required(), "the other worker stayed open"
        with _Counts(two) as counts:  # once a key is seen, asking costs no query
            for _ in range(1000):
                assert await two.auth_required()
        assert counts.seen == 0


async def test_an_anonymous_admin_key_is_refused_by_the_other_worker(sqlite_url: str, tmp_path: Path) -> None:
    """The reviewer's repro in-process: two workers' apps on one database."""
    one, two = _worker(sqlite_url, tmp_path, "one"), _worker(sqlite_url, tmp_path, "two")
    async with AsyncTestClient(_app(one)) as first, AsyncTestClient(_app(two)) as second:
        assert (await second.get("/v1/admin/keys")).status_code == 200  # no key yet: open
        owner = await first.post("/v1/admin/keys", json={"name": "owner", "scopes": ["admin"]})
        assert owner.status_code == 201
        intruder = await second.post("/v1/admin/keys", json={"name": "intruder", "scopes": ["admin"]})
        assert intruder.status_code == 401, intruder.text
        assert [k.name for k in await one.keys.list()] == ["owner"]


async def test_a_count_begun_before_the_first_key_does_not_answer_a_later_request(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests share a count in flight: one arriving after the first key was created
    must not take the "no key" of a count that began before it."""
    async with _worker(sqlite_url, tmp_path, "one") as one, _worker(sqlite_url, tmp_path, "two") as two:
        store, gate, counted = two.keys, asyncio.Event(), asyncio.Event()
        old_count = store._count_keys

        async def count_as_before_the_key() -> tuple[int, bool]:
            if counted.is_set():
                return await old_count()
            store._counts_begun += 1
            begun = store._counts_begun
            counted.set()
            await gate.wait()
            return begun, False  # what a read made before the key was created says

        monkeypatch.setattr(store, "_count_keys", count_as_before_the_key)
        early = asyncio.ensure_future(store.any_exist())
        await counted.wait()
        await one.keys.create("owner", scopes=["admin"])
        late = asyncio.ensure_future(store.any_exist())  # arrives while the old count runs
        await asyncio.sleep(0.01)
        gate.set()
        assert await early is False  # it came before the key: either answer is right
        assert await late is True


async def test_a_request_arriving_as_the_shared_count_ends_gets_a_new_count() -> None:
    """The count is done but its clean-up callback has not run: a request arriving then
    must start a count of its own, not await the finished one forever without yielding
    (a fresh install froze at 100% CPU under concurrent requests)."""
    store = KeyStore(engine=None)  # type: ignore[arg-type]

    async def count_of_no_keys() -> tuple[int, bool]:
        store._counts_begun += 1
        begun = store._counts_begun
        await asyncio.sleep(0)  # the database's round trip
        return begun, False

    store._count_keys = count_of_no_keys  # type: ignore[method-assign]
    first = asyncio.ensure_future(store.any_exist())
    await asyncio.sleep(0)  # the first request starts count 1
    await asyncio.sleep(0)  # count 1 runs, and ends in the same turn the second one arrives
    second = asyncio.ensure_future(store.any_exist())
    async with asyncio.timeout(2):
        assert await first is False and await second is False
    assert store._counts_begun == 2


async def test_while_no_key_exists_concurrent_requests_share_one_count(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with _worker(sqlite_url, tmp_path, "one") as acct:
        with _Counts(acct) as counts:
            answers = await asyncio.gather(*(acct.auth_required() for _ in range(50)))
            assert answers == [False] * 50 and counts.seen == 1
            assert not await acct.auth_required() and counts.seen == 2  # a no is never kept


async def test_an_expiry_past_the_year_9999_is_refused(acct: Accounting) -> None:
    for expires_at in (MAX_EXPIRES_AT + 1, 1e300):
        with pytest.raises(InvalidRequestError) as info:
            await acct.keys.create("far", expires_at=expires_at)
        assert info.value.param == "expires_at"
    key, _ = await acct.keys.create("last-second", expires_at=MAX_EXPIRES_AT)
    with pytest.raises(InvalidRequestError) as info:
        await acct.keys.update(key.id, {"expires_at": 1e300})
    assert info.value.param == "expires_at"


async def test_an_expiry_past_the_year_9999_is_a_400_over_http(sqlite_url: str, tmp_path: Path) -> None:
    acct = _worker(sqlite_url, tmp_path, "one")
    async with AsyncTestClient(_app(acct)) as client:
        admin = await _admin_headers(client)
        for body, param in (
            ({"expires_in_days": 1e300}, "expires_in_days"),
            ({"expires_in_days": 3_000_000}, "expires_in_days"),  # the year 10190 or so
            ({"expires_at": 1e300}, "expires_at"),
            ({"expires_at": MAX_EXPIRES_AT + 1}, "expires_at"),
        ):
            for method, url, name in (
                ("POST", "/v1/admin/keys", {"name": "k"}),
                ("PATCH", "/v1/admin/keys/root", {}),
            ):
                response = await client.request(method, url, json={**body, **name}, headers=admin)
                assert response.status_code == 400, (body, method, response.text)
                assert response.json()["error"]["param"] == param, response.text
        assert [k.expires_at for k in await acct.keys.list()] == [None]
        last = await client.post(
            "/v1/admin/keys", json={"name": "k", "expires_at": MAX_EXPIRES_AT}, headers=admin
        )
        assert last.status_code == 201, last.text


async def test_a_key_stored_with_a_far_expiry_can_still_be_changed(acct: Accounting) -> None:
    """A key stored before far expiries were refused: its other fields still change."""
    key, _ = await acct.keys.create("old")
    await _store(acct, key.id, expires_at=1e300)
    assert (await acct.keys.update(key.id, {"note": "kept"})).note == "kept"


def _cli(tmp_path: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from llmrouter.accounting import cli

    code = cli.main([*args, "--database-url", f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no config file of the checkout's
    return tmp_path


def test_cli_refuses_a_far_expiry_and_lists_one_stored_before(
    cli_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _cli(cli_dir, "keys", "create", "forever", "--expires", "99999999d", capsys=capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--expires 99999999d is after 9999-12-31" in err
    code, out, err = _cli(cli_dir, "keys", "create", "old", "--format", "json", capsys=capsys)
    assert code == 0, err

    async def store_far() -> None:
        async with _cli_accounting(cli_dir) as acct:
            await _store(acct, json.loads(out)["id"], expires_at=1e300)

    asyncio.run(store_far())
    code, out, err = _cli(cli_dir, "keys", "list", capsys=capsys)
    assert code == 0, err
    assert "after 9999-12-31" in out


async def test_a_key_is_found_by_its_prefix_as_listings_and_401s_show_it(acct: Accounting) -> None:
    key, secret = await acct.keys.create("pfx")
    for reference in (
        key.prefix,
        f"sk-llmr-{key.prefix}-",  # keys list's prefix column
        f"sk-llmr-{key.prefix}-...",  # a 401 message
        f"sk-llmr-{key.prefix}",
        secret,  # pasted to revoke a leaked key
    ):
        found = await acct.keys.get(reference)
        assert found is not None and found.id == key.id, reference
    for reference in (f"sk-llmr-{key.prefix}x", f"sk-llmr-{key.prefix[:7]}", "sk-llmr-"):
        assert await acct.keys.get(reference) is None, reference
    assert (await acct.keys.revoke(f"sk-llmr-{key.prefix}-")).revoked_at is not None


async def test_a_prefix_form_wins_over_a_name(acct: Accounting) -> None:
    """Found by id, else prefix, else name: a name spelled as another key's prefix (one
    stored before such names were refused) loses."""
    key, _ = await acct.keys.create("real")
    other, _ = await acct.keys.create("other")
    await _store(acct, other.id, name=f"sk-llmr-{key.prefix}-")
    found = await acct.keys.get(f"sk-llmr-{key.prefix}-")
    assert found is not None and found.name == "real"


async def test_a_name_spelled_as_a_secret_is_refused(acct: Accounting) -> None:
    # Looked up by its prefix in /v1/admin/keys/{key}, it could not be found by name, and
    # it reads as a leaked secret in listings.
    secret_like = "sk-llmr-abcdefgh-xyz"
    with pytest.raises(InvalidRequestError) as info:
        await acct.keys.create(secret_like)
    assert info.value.param == "name"
    key, _ = await acct.keys.create("plain")
    with pytest.raises(InvalidRequestError):
        await acct.keys.update(key.id, {"name": secret_like})


async def test_an_unknown_secret_given_as_a_reference_is_not_echoed(sqlite_url: str, tmp_path: Path) -> None:
    acct = _worker(sqlite_url, tmp_path, "one")
    secret = "sk-llmr-abcdefgh-" + "S" * 43  # no such key
    async with AsyncTestClient(_app(acct)) as client:
        with pytest.raises(NotFoundError) as info:
            await acct.keys.revoke(secret)
        assert "S" * 10 not in info.value.message and "sk-llmr-abcdefgh-..." in info.value.message
        with pytest.raises(NotFoundError) as info:
            await acct.keys.update(secret, {"note": "x"})
        assert "S" * 10 not in info.value.message
        for method, url in (
            ("GET", f"/v1/admin/keys/{secret}"),
            ("DELETE", f"/v1/admin/keys/{secret}"),
            ("PATCH", f"/v1/admin/keys/{secret}"),
            ("POST", f"/v1/admin/keys/{secret}/rotate"),
            ("GET", f"/v1/admin/usage?key={secret}"),
        ):
            response = await client.request(method, url, json={} if method == "PATCH" else None)
            assert response.status_code in (400, 404), (url, response.text)
            assert "S" * 10 not in response.text and "sk-llmr-abcdefgh-..." in response.text, url


def test_cli_takes_the_prefix_column_as_a_reference(
    cli_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _cli(cli_dir, "keys", "create", "pfx", "--format", "json", capsys=capsys)
    assert code == 0, err
    created = json.loads(out)
    column = f"sk-llmr-{created['prefix']}-"
    code, out, err = _cli(cli_dir, "keys", "list", capsys=capsys)
    assert column in out.split()
    code, out, err = _cli(cli_dir, "usage", "report", "--key", column, "--format", "csv", capsys=capsys)
    assert code == 0, err
    code, out, err = _cli(cli_dir, "keys", "revoke", column, capsys=capsys)
    assert code == 0 and created["id"] in out, err
    missing = "sk-llmr-zzzzzzzz-" + "S" * 43
    code, out, err = _cli(cli_dir, "usage", "report", "--key", missing, capsys=capsys)
    assert code == 1 and "S" * 10 not in err and "sk-llmr-zzzzzzzz-..." in err


async def test_a_name_with_a_slash_is_refused(acct: Accounting) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await acct.keys.create("team-a/ci")
    assert info.value.param == "name" and "/" in info.value.message
    key, _ = await acct.keys.create("team-a-ci")
    with pytest.raises(InvalidRequestError) as info:
        await acct.keys.update(key.id, {"name": "team-a/ci"})
    assert info.value.param == "name"
    await _store(acct, key.id, name="legacy/ci")  # stored before the rule
    assert (await acct.keys.update(key.id, {"note": "kept"})).name == "legacy/ci"
    assert (await acct.keys.update(key.id, {"name": "legacy-ci"})).name == "legacy-ci"


async def test_a_name_with_a_slash_is_a_400_over_http(sqlite_url: str, tmp_path: Path) -> None:
    acct = _worker(sqlite_url, tmp_path, "one")
    async with AsyncTestClient(_app(acct)) as client:
        created = await client.post("/v1/admin/keys", json={"name": "team-a/ci", "scopes": ["admin"]})
        assert created.status_code == 400 and created.json()["error"]["param"] == "name"
        admin = await _admin_headers(client)
        renamed = await client.patch("/v1/admin/keys/root", json={"name": "a/b"}, headers=admin)
        assert renamed.status_code == 400 and renamed.json()["error"]["param"] == "name"


def test_cli_refuses_a_name_with_a_slash_in_one_line(
    cli_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _cli(cli_dir, "keys", "create", "team-a/ci", capsys=capsys)
    assert code == 1 and out == "" and err.count("\n") == 1 and "without '/'" in err


def test_report_output_ends_with_a_newline_and_an_empty_csv_keeps_its_header() -> None:
    assert render([], "json") == "[]\n"
    assert render([{"requests": 1, "cost": 0.5}], "json").endswith("}\n]\n")
    header = render([], "csv", columns=report_columns(["key", "model"]))
    assert (
        header
        == "key,key_name,model,requests,prompt_tokens,completion_tokens,cached_tokens,estimated,errors,cache_hits,cost\n"
    )
    assert render([], "csv", columns=report_columns([""])).startswith("requests,")


async def test_report_columns_are_those_of_a_report(acct: Accounting) -> None:
    from .test_acct_reports import _seed

    await _seed(acct)
    for by in (["key", "model"], ["day", "user", "status"], ["provider", "key", "deployment"], []):
        rows = await usage_report(acct.engine, by=by)
        assert list(rows[0]) == report_columns(by), by


def test_cli_report_formats_end_with_a_newline(cli_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(cli_dir, "db", "upgrade", capsys=capsys)[0] == 0
    empty = ("--since", "2020-01-01", "--until", "2020-01-02")
    code, out, err = _cli(cli_dir, "usage", "report", "--by", "", "--format", "json", capsys=capsys)
    assert code == 0 and out.endswith("}\n]\n") and json.loads(out)[0]["requests"] == 0, err
    code, out, err = _cli(cli_dir, "usage", "report", *empty, "--format", "csv", capsys=capsys)
    assert code == 0, err
    assert out.startswith("key,key_name,model,requests,") and out.count("\n") == 1
    assert list(csv.DictReader(io.StringIO(out))) == []


def test_read_only_commands_make_no_database(cli_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Run from another directory (the default SQLite path is relative) or given a
    mistyped ``--database-url``, ``usage report`` made and migrated an empty database and
    printed "(no usage in this range)", exit 0."""
    path = cli_dir / "cli.db"
    missing = f"llmrouter: error: no ledger at {path} (run llmrouter db upgrade, or pass --database-url)\n"
    for command in (("usage", "report"), ("keys", "list"), ("db", "status")):
        assert _cli(cli_dir, *command, capsys=capsys) == (1, "", missing), command
    assert not path.exists()
    path.touch()  # a database without the ledger (as a fresh PostgreSQL database is)
    assert _cli(cli_dir, "usage", "report", capsys=capsys) == (1, "", missing)
    assert _cli(cli_dir, "db", "status", capsys=capsys)[0] == 3  # behind: what it reports
    assert _cli(cli_dir, "db", "upgrade", capsys=capsys)[0] == 0
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "DELETE FROM llmr_schema_version WHERE version = (SELECT max(version) FROM llmr_schema_version)"
        )
    code, _, err = _cli(cli_dir, "keys", "list", capsys=capsys)
    assert code == 1 and f"the ledger at {path} has schema version" in err and "db upgrade" in err
    assert _cli(cli_dir, "db", "upgrade", capsys=capsys)[0] == 0
    assert _cli(cli_dir, "keys", "list", capsys=capsys) == (0, "(no keys)\n", "")


async def _admin_headers(client: Any) -> dict[str, str]:
    """Create the first key, ``root``, an admin one (auth is off until then); its headers."""
    created = await client.post("/v1/admin/keys", json={"name": "root", "scopes": ["admin"]})
    assert created.status_code == 201, created.text
    return {"Authorization": f"Bearer {created.json()['secret']}"}


async def _store(acct: Accounting, key_id: str, **values: Any) -> None:
    """Write ``values`` into a key's row as an older version could have."""
    from sqlalchemy import update

    from llmrouter.accounting.models import ApiKeyRow

    table = ApiKeyRow.__table__  # type: ignore[attr-defined]
    async with acct.engine.begin() as conn:
        await conn.execute(update(table).where(table.c.id == key_id).values(**values))


def _cli_accounting(cli_dir: Path) -> Accounting:
    return _worker(f"sqlite+aiosqlite:///{cli_dir / 'cli.db'}", cli_dir, "lib")


async def test_the_key_routes_take_a_compressed_body(sqlite_url: str, tmp_path: Path) -> None:
    # As the completion routes do (docs/service.md): they read the raw bytes, and a gzip
    # body was "JSON is malformed".
    acct = _worker(sqlite_url, tmp_path, "one")
    async with AsyncTestClient(_app(acct)) as client:
        admin = await _admin_headers(client)
        gzipped = {**admin, "content-type": "application/json", "content-encoding": "gzip"}
        created = await client.post(
            "/v1/admin/keys", content=gzip.compress(b'{"name": "zipped"}'), headers=gzipped
        )
        assert created.status_code == 201, created.text
        changed = await client.patch(
            "/v1/admin/keys/zipped", content=gzip.compress(b'{"note": "inflated"}'), headers=gzipped
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["note"] == "inflated"


async def test_a_secret_given_as_a_reference_is_no_query_parameter(acct: Accounting) -> None:
    # The database driver's debug log writes a query's parameters: the secret was one.
    key, secret = await acct.keys.create("leaked")
    seen: list[str] = []

    def record(conn: object, cursor: object, statement: str, parameters: Any, *args: object) -> None:
        seen.append(repr(parameters))

    engine = acct.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        found = await acct.keys.get(secret)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert found is not None and found.id == key.id
    assert seen and not any(secret[-20:] in parameters for parameters in seen)
