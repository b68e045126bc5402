"""Reports (grouping, ranges, table/CSV/JSON), the CLI, and migrations."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import inspect, text

from llmrouter.accounting import Accounting
from llmrouter.accounting.budget_stores import DatabaseBudgetStore
from llmrouter.accounting.budgets import BudgetWindow
from llmrouter.accounting.db import create_engine
from llmrouter.accounting.entry import utc_day
from llmrouter.accounting.keys import KeyStore, hash_secret
from llmrouter.accounting.ledger import insert_rows
from llmrouter.accounting.migrations import MIGRATIONS, current_version, latest_version, upgrade
from llmrouter.accounting.models import BudgetReservationRow
from llmrouter.accounting.reports import parse_range, parse_time, render, report_query, usage_report
from llmrouter.errors import InvalidRequestError

from .conftest import make_config

pytestmark = pytest.mark.anyio

DAY1 = datetime(2026, 11, 1, 12, tzinfo=UTC).timestamp()
DAY2 = datetime(2026, 11, 2, 12, tzinfo=UTC).timestamp()


def _row(
    i: int, ts: float, key: str | None, model: str, provider: str, cost: float, **extra: object
) -> dict[str, object]:
    return {
        "entry_id": f"e{i}",
        "request_id": f"r{i}",
        "created_at": ts,
        "day": utc_day(ts),
        "api_key_id": key,
        "model_group": model,
        "provider": provider,
        "deployment": f"{provider}/{model}",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cached_tokens": 2,
        "cost": cost,
        "status": "ok",
        **extra,
    }


async def _seed(acct: Accounting) -> tuple[str, str]:
    alice, _ = await acct.keys.create("alice")
    bob, _ = await acct.keys.create("bob")
    await insert_rows(
        acct.engine,
        [
            _row(1, DAY1, alice.id, "gpt-4o", "openai", 0.01),
            _row(2, DAY1, alice.id, "gpt-4o", "openai", 0.02, usage_estimated=True),
            _row(3, DAY1, bob.id, "smol", "transformers", 0.0, cache_status="hit"),
            _row(4, DAY2, alice.id, "smol", "transformers", 0.0, status="cancelled"),
            _row(5, DAY2, None, "gpt-4o", "openai", 0.5),
        ],
    )
    return alice.id, bob.id


async def test_grouping_and_ranges(db_url: str, tmp_path: Path) -> None:
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        alice, bob = await _seed(acct)
        rows = await usage_report(acct.engine, by=["key", "model"])
        assert {(r["key_name"], r["model"]): (r["requests"], r["cost"]) for r in rows} == {
            ("alice", "gpt-4o"): (2, 0.03),
            ("alice", "smol"): (1, 0.0),
            ("bob", "smol"): (1, 0.0),
            (None, "gpt-4o"): (1, 0.5),
        }
        alice_gpt = next(r for r in rows if r["key"] == alice and r["model"] == "gpt-4o")
        assert (
            alice_gpt["prompt_tokens"] == 20
            and alice_gpt["cached_tokens"] == 4
            and alice_gpt["estimated"] == 1
        )
        by_day = await usage_report(
            acct.engine,
            by=["day", "provider"],
            since=parse_time("2026-11-02"),
            until=parse_time("2026-11-02", end=True),
        )
        assert [(r["day"], r["provider"], r["requests"], r["errors"]) for r in by_day] == [
            ("2026-11-02", "openai", 1, 0),
            ("2026-11-02", "transformers", 1, 1),
        ]
        own = await usage_report(acct.engine, by=["day", "model"], key_id=alice)
        assert sum(r["requests"] for r in own) == 3
        bobs = await usage_report(acct.engine, by=[], key_id=bob)
        assert bobs == [
            {
                "requests": 1,
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "cached_tokens": 2,
                "estimated": 0,
                "errors": 0,
                "cache_hits": 1,
                "cost": 0.0,
            }
        ]
        with pytest.raises(InvalidRequestError):
            await usage_report(acct.engine, by=["colour"])
        # A dimension named twice is grouped by once (it was an ambiguous column: a 500).
        assert await usage_report(acct.engine, by=["day", " day", "provider"]) == await usage_report(
            acct.engine, by=["day", "provider"]
        )


async def test_sqlite_groups_every_keys_rows_by_a_scan_not_the_key_index(acct: Accounting) -> None:
    """Walking the (api_key_id, created_at) index reads the table in that order, row by
    row: three times slower than a scan for a million rows. One key's rows still use it."""

    async def plan(**filters: Any) -> str:
        query = report_query(["key", "model"], sqlite=True, **filters)
        sql = str(query.compile(acct.engine, compile_kwargs={"literal_binds": True}))
        async with acct.engine.connect() as conn:
            return " / ".join(
                row[-1] for row in (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)).all()
            )

    assert "ix_llmr_ledger_key_created" not in await plan()
    assert "ix_llmr_ledger_key_created" not in await plan(since=0.0)
    assert "ix_llmr_ledger_key_created" in await plan(key_id="key_x")
    assert "ix_llmr_ledger_key_created" in await plan(anonymous=True)


async def test_render_formats(acct: Accounting) -> None:
    await _seed(acct)
    rows = await usage_report(acct.engine, by=["key", "model"])
    parsed = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    assert len(parsed) == 4 and parsed[0].keys() >= {"key", "key_name", "model", "requests", "cost"}
    assert sum(float(r["cost"]) for r in parsed) == pytest.approx(0.53)
    assert json.loads(render(rows, "json")) == rows
    table = render(rows, "table")
    assert "TOTAL" in table and "$0.530000" in table and "alice" in table
    assert render([], "table").startswith("(no usage")


def test_csv_quotes_what_a_spreadsheet_would_run() -> None:
    rows = [
        {"user": '=HYPERLINK("http://x.test","click")', "model": "-2+3", "requests": -1, "cost": 0.5},
        {"user": "@SUM(A1)", "model": "gpt-4o", "requests": 2, "cost": 1.0},
    ]
    parsed = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    assert [(r["user"], r["model"], r["requests"]) for r in parsed] == [
        ('\'=HYPERLINK("http://x.test","click")', "'-2+3", "-1"),  # numbers stay numbers
        ("'@SUM(A1)", "gpt-4o", "2"),
    ]


def test_parse_time() -> None:
    assert parse_time("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    assert parse_time("2026-11-01", end=True) == datetime(2026, 11, 2, tzinfo=UTC).timestamp()
    assert parse_time("2026-11-01T10:00:00Z") == datetime(2026, 11, 1, 10, tzinfo=UTC).timestamp()
    assert parse_time(None) is None
    with pytest.raises(InvalidRequestError, match="not a date"):
        parse_time("last tuesday")
    # These overflowed into 500s.
    for moment, end in [("9999-12-31", True), ("9" * 400 + "d", False)]:
        with pytest.raises(InvalidRequestError, match="out of range"):
            parse_time(moment, end=end)
    assert parse_time("9999-12-31") == datetime(9999, 12, 31, tzinfo=UTC).timestamp()


def test_parse_range() -> None:
    day = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    assert parse_range("2026-11-01", "2026-11-01") == (day, day + 86400), "until takes in its whole day"
    assert parse_range(None, "2026-11-01") == (None, day + 86400)
    with pytest.raises(InvalidRequestError, match="not after since") as info:
        parse_range("24h", "7d")  # the other way round: an empty report would read as no usage
    assert info.value.param == "until"
    with pytest.raises(InvalidRequestError) as info:
        parse_range("2026-11-01", "soon")
    assert info.value.param == "until"


def test_a_date_in_any_iso_form_is_a_whole_day() -> None:
    """``datetime.fromisoformat`` takes ``20261101`` and ``2026W447`` too, as midnight:
    ``since=until=20261101`` was an empty range, an empty report passing for no usage."""
    day = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    for written in ("2026-11-01", "20261101", "2026-W44-7", "2026W447"):
        assert parse_range(written, written) == (day, day + 86400), written
    assert parse_time("20261101T10:00:00Z") == day + 10 * 3600  # a time is still a moment


def test_an_empty_range_is_refused() -> None:
    """An ``until`` equal to ``since`` leaves nothing between them: a 400, as for one before."""
    with pytest.raises(InvalidRequestError, match="not after since") as info:
        parse_range("2026-11-01T10:00:00Z", "2026-11-01T10:00:00Z")
    assert info.value.param == "until"


def test_a_table_without_grouping_keeps_its_requests_total() -> None:
    """With no dimension (``usage report --by ''``) every column is a number: the TOTAL
    label took the requests' place."""
    row = {"requests": 7, "prompt_tokens": 100, "cost": 0.25}
    lines = render([row, row]).splitlines()
    assert lines[0].split() == ["requests", "prompt_tokens", "cost"]
    assert lines[-1].split() == ["TOTAL", "14", "200", "$0.500000"]
    assert lines[2].split() == ["7", "100", "$0.250000"]
    grouped = render([{"day": "2026-11-01", **row}]).splitlines()
    assert grouped[-1].split() == ["TOTAL", "7", "100", "$0.250000"]  # the label in its column


async def test_migrations_are_idempotent_and_safe_to_race(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        assert await current_version(engine) == 0
        results: list[list[int]] = []

        async def run() -> None:
            results.append(await upgrade(engine))

        async with anyio.create_task_group() as tg:  # three replicas starting at once
            for _ in range(3):
                tg.start_soon(run)
        assert sorted(map(tuple, results)) == [(), (), (1, 2, 3, 4, 5)]
        assert await upgrade(engine) == []
        assert await current_version(engine) == latest_version()
        async with engine.connect() as conn:
            versions = (await conn.execute(text("SELECT version FROM llmr_schema_version"))).scalars().all()
        assert sorted(versions) == [1, 2, 3, 4, 5]
    finally:
        await engine.dispose()


async def test_migration_2_drops_the_ledgers_unused_indexes(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        async with engine.begin() as conn:  # a database as migration 1 made it before
            await conn.run_sync(MIGRATIONS[0].apply)
            await conn.execute(text("CREATE INDEX ix_llmr_ledger_request_id ON llmr_ledger (request_id)"))
            await conn.execute(text("CREATE INDEX ix_llmr_ledger_day ON llmr_ledger (day)"))
            await conn.execute(text("INSERT INTO llmr_schema_version VALUES (1, 'v1', 0)"))
        assert await upgrade(engine) == [2, 3, 4, 5]
        async with engine.connect() as conn:
            indexes = await conn.run_sync(
                lambda c: {i["name"] for i in inspect(c).get_indexes("llmr_ledger")}
            )
        assert "ix_llmr_ledger_key_created" in indexes
        assert not indexes & {"ix_llmr_ledger_request_id", "ix_llmr_ledger_day"}
    finally:
        await engine.dispose()


async def test_migration_3_adds_budget_version_to_existing_keys(db_url: str) -> None:
    secret = "sk-llmr-abcdefgh-" + "x" * 43
    engine = create_engine(db_url)
    try:
        async with engine.begin() as conn:  # a database of the release before, with a key
            await conn.run_sync(MIGRATIONS[0].apply)
            await conn.execute(text("ALTER TABLE llmr_api_keys DROP COLUMN budget_version"))
            await conn.execute(text("INSERT INTO llmr_schema_version VALUES (1, 'v1', 0), (2, 'v2', 0)"))
            await conn.execute(
                text(
                    "INSERT INTO llmr_api_keys (id, name, prefix, secret_hash, scopes, created_at, budget, "
                    "budget_period) VALUES ('key_old', 'old', 'abcdefgh', :hash, 'user', 0, 5.0, 'month')"
                ),
                {"hash": hash_secret(secret)},
            )
        assert await upgrade(engine) == [3, 4, 5]
        store = KeyStore(engine)
        assert (await store.verify(secret)).budget_version == 0
        changed = await store.update("key_old", {"budget_period": "day"})
        assert (changed.budget_period, changed.budget_version) == ("day", 1)
    finally:
        await engine.dispose()


async def test_reports_by_and_for_an_end_user(db_url: str, tmp_path: Path) -> None:
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        key, _ = await acct.keys.create("saas")
        await insert_rows(
            acct.engine,
            [
                _row(1, DAY1, key.id, "gpt-4o", "openai", 0.25, end_user="user-1"),
                _row(2, DAY1, key.id, "gpt-4o", "openai", 0.5, end_user="user-1"),
                _row(3, DAY2, key.id, "gpt-4o", "openai", 1.0, end_user="user-2"),
                _row(4, DAY2, key.id, "gpt-4o", "openai", 2.0),
            ],
        )
        rows = await usage_report(acct.engine, by=["user"])
        assert [(r["user"], r["requests"], r["cost"]) for r in rows] in (
            [(None, 1, 2.0), ("user-1", 2, 0.75), ("user-2", 1, 1.0)],  # SQLite: NULL first
            [("user-1", 2, 0.75), ("user-2", 1, 1.0), (None, 1, 2.0)],  # PostgreSQL: NULL last
        )
        one = await usage_report(acct.engine, by=["day"], key_id=key.id, end_user="user-1")
        assert [(r["day"], r["cost"]) for r in one] == [("2026-11-01", 0.75)]


async def test_migration_4_adds_end_user_to_the_ledger(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        async with engine.begin() as conn:  # a ledger of the release before, with a row
            await conn.run_sync(MIGRATIONS[0].apply)
            await conn.execute(text("ALTER TABLE llmr_ledger DROP COLUMN end_user"))
            await conn.execute(
                text("INSERT INTO llmr_schema_version VALUES (1, 'v1', 0), (2, 'v2', 0), (3, 'v3', 0)")
            )
            await conn.execute(
                text(
                    "INSERT INTO llmr_ledger (entry_id, request_id, created_at, day, operation, stream, "
                    "prompt_tokens, completion_tokens, cached_tokens, cost, usage_estimated, status, attempts) "
                    "VALUES ('old', 'r', :ts, '2026-11-01', 'chat', false, 1, 1, 0, 0.5, false, 'ok', 1)"
                ),
                {"ts": DAY1},
            )
        assert await upgrade(engine) == [4, 5]
        await insert_rows(engine, [_row(1, DAY1, None, "gpt-4o", "openai", 0.25, end_user="user-1")])
        rows = await usage_report(engine, by=["user"])
        assert {r["user"]: r["cost"] for r in rows} == {None: 0.5, "user-1": 0.25}
    finally:
        await engine.dispose()


async def test_migration_5_adds_leases_beside_counters_in_use(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        async with engine.begin() as conn:  # a database of the release before, a reservation open
            await conn.run_sync(MIGRATIONS[0].apply)
            await conn.execute(text("DROP TABLE llmr_budget_reservations"))
            await conn.execute(text("DROP INDEX ix_llmr_budget_counters_ends_at"))
            await conn.execute(text("ALTER TABLE llmr_budget_counters DROP COLUMN ends_at"))
            await conn.execute(
                text(
                    "INSERT INTO llmr_schema_version VALUES (1, 'v1', 0), (2, 'v2', 0), (3, 'v3', 0), (4, 'v4', 0)"
                )
            )
            await conn.execute(text("INSERT INTO llmr_budget_counters VALUES ('k:total', 100, 40)"))
        assert await upgrade(engine) == [5]
        async with engine.connect() as conn:  # the tables migration 1 makes today
            assert await conn.run_sync(_reservations_shape) == (
                tuple((c.name, c.nullable) for c in BudgetReservationRow.__table__.columns),  # type: ignore[attr-defined]
                ("counter", "request_id"),
            )
            counters = await conn.run_sync(lambda c: inspect(c).get_columns("llmr_budget_counters"))
            indexes = await conn.run_sync(lambda c: inspect(c).get_indexes("llmr_budget_counters"))
        assert [(c["name"], c["nullable"]) for c in counters][-1] == ("ends_at", True)
        assert [i["name"] for i in indexes] == ["ix_llmr_budget_counters_ends_at"]

        async def seed(_: BudgetWindow) -> int:
            raise AssertionError("the counter exists")

        store = DatabaseBudgetStore(engine, seed)
        budget = BudgetWindow("k:total", "k", None, "total", 0.0, None, 1_000, None)
        assert await store.reserve(budget, 500, "r1") == (True, 100, 540)
        assert await store.settle(budget, 500, 200, "r1") == 300
        assert await store.usage(budget) == (300, 40)  # the old replica's reservation is its own to settle
    finally:
        await engine.dispose()


def _reservations_shape(conn: Any) -> tuple[object, ...]:
    found = inspect(conn)
    columns = [(c["name"], c["nullable"]) for c in found.get_columns("llmr_budget_reservations")]
    return tuple(columns), tuple(found.get_pk_constraint("llmr_budget_reservations")["constrained_columns"])


def _cli(tmp_path: Path, *args: str, database_url: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "llmrouter.cli",
            *args,
            "--database-url",
            database_url or f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path.cwd())},
    )


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("postgresql+asyncpg://llmrouter@127.0.0.1:1/llmrouter", "ConnectionRefusedError"),
        ("postgresql+asyncpg://llmrouter@nosuchhost.invalid/llmrouter", "gaierror"),
    ],
)
def test_cli_without_its_database_errs_in_one_line(tmp_path: Path, url: str, cause: str) -> None:
    for command in (("db", "upgrade"), ("keys", "list"), ("usage", "report")):
        done = _cli(tmp_path, *command, database_url=url)
        assert done.returncode == 1
        assert done.stderr.startswith(f"llmrouter: error: the accounting database: {cause}")
        assert "Traceback" not in done.stderr


def test_cli_db_keys_and_usage_report(tmp_path: Path) -> None:
    up = _cli(tmp_path, "db", "upgrade")
    assert up.returncode == 0, up.stderr
    assert "applied migrations [1, 2, 3, 4, 5]" in up.stdout
    assert "up to date" in _cli(tmp_path, "db", "upgrade").stdout
    created = _cli(
        tmp_path,
        "keys",
        "create",
        "ci-bot",
        "--scope",
        "admin",
        "--models",
        "gpt-4o,local-*",
        "--expires",
        "30d",
        "--budget",
        "5",
        "--format",
        "json",
    )
    assert created.returncode == 0, created.stderr
    info = json.loads(created.stdout)
    assert info["secret"].startswith(f"sk-llmr-{info['prefix']}-")
    listing = _cli(tmp_path, "keys", "list")
    assert "ci-bot" in listing.stdout and "active" in listing.stdout and info["secret"] not in listing.stdout
    listing_json = json.loads(_cli(tmp_path, "keys", "list", "--format", "json").stdout)
    assert listing_json[0]["allowed_models"] == ["gpt-4o", "local-*"] and listing_json[0]["budget"] == 5.0
    assert _cli(tmp_path, "keys", "revoke", "ci-bot").returncode == 0
    assert "revoked" in _cli(tmp_path, "keys", "list").stdout
    assert _cli(tmp_path, "keys", "revoke", "nobody").returncode == 1
    past = _cli(tmp_path, "keys", "create", "late", "--expires", "2020-01-01")
    assert past.returncode == 2 and "in the past" in past.stderr

    async def seed() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}")
        await insert_rows(
            engine,
            [
                _row(1, DAY1, info["id"], "gpt-4o", "openai", 0.25),
                _row(2, DAY2, info["id"], "gpt-4o", "openai", 0.5),
            ],
        )
        await engine.dispose()

    anyio.run(seed)
    report = _cli(
        tmp_path,
        "usage",
        "report",
        "--by",
        "key,model",
        "--since",
        "2026-11-01",
        "--until",
        "2026-11-01",
        "--format",
        "csv",
    )
    assert report.returncode == 0, report.stderr
    (row,) = list(csv.DictReader(io.StringIO(report.stdout)))
    assert row["key_name"] == "ci-bot" and float(row["cost"]) == 0.25
    day_json = json.loads(_cli(tmp_path, "usage", "report", "--by", "day", "--format", "json").stdout)
    assert [(r["day"], r["cost"]) for r in day_json] == [("2026-11-01", 0.25), ("2026-11-02", 0.5)]
    assert "TOTAL" in _cli(tmp_path, "usage", "report").stdout


def test_cli_keys_update_and_rotate(tmp_path: Path) -> None:
    created = json.loads(_cli(tmp_path, "keys", "create", "app", "--rpm", "5", "--format", "json").stdout)
    changed = _cli(
        tmp_path, "keys", "update", "app", "--budget", "20", "--budget-period", "day", "--clear", "rpm"
    )
    assert changed.returncode == 0, changed.stderr
    assert "updated key" in changed.stdout and "budget, budget_period, rpm" in changed.stdout
    [key] = json.loads(_cli(tmp_path, "keys", "list", "--format", "json").stdout)
    assert (key["budget"], key["budget_period"], key["rpm"], key["id"]) == (20.0, "day", None, created["id"])
    assert _cli(tmp_path, "keys", "update", "app", "--tpm", "900").returncode == 0
    table = _cli(tmp_path, "keys", "list").stdout
    assert "rpm/tpm/conc" in table and "-/900/-" in table
    for args, says in (
        ((), "nothing to change"),
        (("--rpm", "3", "--clear", "rpm"), "--clear rpm and a new value"),
        (("--expires", "2020-01-01"), "in the past"),
    ):
        refused = _cli(tmp_path, "keys", "update", "app", *args)
        assert refused.returncode == 2 and says in refused.stderr, refused.stderr
    invalid = _cli(tmp_path, "keys", "update", "app", "--rpm", "0")
    assert invalid.returncode == 1 and "rpm must be between 1" in invalid.stderr
    rotated = _cli(tmp_path, "keys", "rotate", "app", "--format", "json")
    assert rotated.returncode == 0, rotated.stderr
    new = json.loads(rotated.stdout)
    assert new["id"] == created["id"] and new["secret"] != created["secret"]
    assert new["secret"].startswith(f"sk-llmr-{new['prefix']}-")
    assert _cli(tmp_path, "keys", "revoke", "app").returncode == 0
    revoked = _cli(tmp_path, "keys", "update", "app", "--rpm", "3")
    assert revoked.returncode == 1 and "is revoked" in revoked.stderr and "Traceback" not in revoked.stderr


def test_cli_keys_update_with_no_models_allows_every_model(tmp_path: Path) -> None:
    """``--models ''`` means every model for ``create``; ``update`` stored an empty list,
    a key that may use no model at all."""
    _cli(tmp_path, "keys", "create", "app", "--models", "gpt-4o")
    updated = _cli(tmp_path, "keys", "update", "app", "--models", "")
    assert updated.returncode == 0, updated.stderr
    [key] = json.loads(_cli(tmp_path, "keys", "list", "--format", "json").stdout)
    assert key["allowed_models"] is None


def test_the_standalone_cli_errs_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m llmrouter.accounting.cli`` printed a traceback for a bad key or date."""
    from llmrouter.accounting import cli

    monkeypatch.chdir(tmp_path)  # no config file of the checkout's
    url = ["--database-url", f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"]
    for args, says in (
        (["keys", "revoke", "nope"], "llmrouter: error: no API key 'nope'\n"),
        (["usage", "report", "--since", "yesterday"], "llmrouter: error: not a date or time: 'yesterday'"),
    ):
        assert cli.main([*args, *url]) == 1
        err = capsys.readouterr().err
        assert err.startswith(says) and err.count("\n") == 1, err
