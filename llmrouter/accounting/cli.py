"""``llmrouter keys|usage|db`` sub-commands (registered by :mod:`llmrouter.cli`).

::

    llmrouter keys create NAME [--scope admin] [--models gpt-4o,local-*] [--expires 30d]
                               [--budget 10 --budget-period month] [--rpm N] [--tpm N] [--concurrency N]
    llmrouter keys list [--active] [--format table|json]
    llmrouter keys update KEY [--name N] [--scope admin] [--models ...] [--expires 30d] [--budget 20]
                              [--budget-period day] [--rpm N] [--tpm N] [--concurrency N] [--note T]
                              [--clear models|expires|budget|rpm|tpm|concurrency|note]
    llmrouter keys rotate KEY [--format json]   # a new secret for the same key, printed once
    llmrouter keys revoke KEY            # id, prefix or name
    llmrouter usage report [--by key,model,user] [--since 2026-11-01] [--until 2026-11-30] [--key KEY]
                           [--user END_USER] [--format table|csv|json]
    llmrouter db upgrade | db status

Every command takes ``--config`` (like ``serve``) and ``--database-url`` (wins over it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio

from llmrouter.accounting.config import AccountingConfig, DatabaseConfig
from llmrouter.errors import AccountingUnavailableError, one_line_cause

__all__ = ["main", "register"]


def _section(args: argparse.Namespace) -> AccountingConfig:
    from llmrouter.cli import find_config_path
    from llmrouter.config import load_config

    section = load_config(find_config_path(getattr(args, "config", None))).accounting
    url = getattr(args, "database_url", None)
    if url:
        import msgspec

        section = msgspec.structs.replace(section, database=DatabaseConfig(url=url))
    return section


def _with_db(args: argparse.Namespace, body: Callable[[Any], Awaitable[int]], *, migrate: bool = True) -> int:
    """Run ``body`` on the accounting database, its pending migrations applied first with
    ``migrate`` and ``database.create`` (a command that changes keys may set up the
    database, as ``serve`` does)."""
    return _run_on(_section(args).database, body, migrate=migrate)


def _run_on(database: DatabaseConfig, body: Callable[[Any], Awaitable[int]], *, migrate: bool) -> int:
    from llmrouter.accounting.db import create_engine
    from llmrouter.accounting.migrations import upgrade

    async def run() -> int:
        from sqlalchemy.exc import DBAPIError

        engine = create_engine(database)
        try:
            if migrate and database.create:
                await upgrade(engine)
            return await body(engine)
        except (OSError, DBAPIError) as exc:  # unreachable, refused, no such role or database
            raise AccountingUnavailableError(f"the accounting database: {one_line_cause(exc)}") from exc
        finally:
            await engine.dispose()

    return anyio.run(run)


def _reading_db(
    args: argparse.Namespace, body: Callable[[Any], Awaitable[int]], *, any_schema: bool = False
) -> int:
    """Run ``body`` of a command that only reads (``keys list``, ``usage report``, ``db
    status``): it creates and migrates nothing, and a database without the ledger is one
    line and exit status 1. Run from another directory (the default SQLite path is
    relative) or given a mistyped ``--database-url``, these made an empty database and
    reported it: no usage, no keys. ``any_schema``: a ledger whose schema is behind is
    read all the same (``db status`` says so); otherwise it is refused too."""
    from llmrouter.accounting.migrations import current_version, latest_version

    database = _section(args).database
    missing = f"no ledger at {_shown(database.url)} (run llmrouter db upgrade, or pass --database-url)"
    if _missing_sqlite_file(database.url):
        return _error(missing)

    async def checked(engine: Any) -> int:
        if not any_schema:
            version, latest = await current_version(engine), latest_version()
            if version == 0:
                return _error(missing)
            if version < latest:
                return _error(
                    f"the ledger at {_shown(database.url)} has schema version {version} of {latest} "
                    "(run llmrouter db upgrade)"
                )
        return await body(engine)

    return _run_on(database, checked, migrate=False)


def _missing_sqlite_file(url: str) -> bool:
    """Whether ``url`` names a SQLite file that does not exist (opening it would make it)."""
    from pathlib import Path

    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL: create_engine says so
        return False
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return False
    if database.startswith("file:"):  # a URI filename (?uri=true): left to SQLite
        return False
    return not Path(database).expanduser().exists()


def _shown(url: str) -> str:
    """The database ``url`` names, for a message: a SQLite file's path, else the URL
    without its password."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001
        return url
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        return parsed.database
    return parsed.render_as_string(hide_password=True)


def _error(message: str) -> int:
    print(f"llmrouter: error: {message}", file=sys.stderr)
    return 1


@asynccontextmanager
async def _changing_keys(engine: Any, args: argparse.Namespace) -> AsyncIterator[Any]:
    """A key store whose changes reach running replicas at once, through Redis when the
    config has it, else PostgreSQL (on SQLite they see them within ``auth.cache_seconds``)."""
    from llmrouter.accounting.key_events import key_events_for
    from llmrouter.accounting.keys import KeyStore

    store = KeyStore(engine)
    section = _section(args)
    client = None
    if section.redis.url is not None:
        from llmrouter.redis_pool import connect

        client = connect(section.redis.url, timeout=section.redis.timeout)
    events = key_events_for(engine, client, config=section, forget=store.forget, follow=False)
    store.on_change = events.publish if events is not None else None
    try:
        yield store
    finally:
        if client is not None:
            await client.aclose()


def _when(ts: float | None) -> str:
    """``ts`` as a UTC date and time; one no date can show (an expiry past the year 9999,
    stored before such were refused) as the bound it passes, rather than a crash."""
    if ts is None:
        return "-"
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")
    except (ValueError, OverflowError, OSError):
        return "after 9999-12-31" if ts > 0 else "before 0001-01-01"


class _UsageError(Exception):
    """A command-line value that cannot be used (exit status 2)."""


def _expires_at(text: str) -> float | None:
    """``--expires``: ``30d``, ``12h``, ``2w`` from now, or a date/time (UTC) in the future."""
    from llmrouter.accounting.keys import MAX_EXPIRES_AT
    from llmrouter.accounting.reports import parse_time

    # "30d" means 30 days from now (parse_time reads it as 30 days ago).
    expires_at: float | None
    if text[-1:] in ("h", "d", "w") and text[:-1].isdigit():
        expires_at = 2 * time.time() - (parse_time(text) or 0.0)
    else:
        expires_at = parse_time(text)
    if expires_at is not None and expires_at <= time.time():
        raise _UsageError(f"--expires {text} is in the past")
    if expires_at is not None and expires_at > MAX_EXPIRES_AT:
        raise _UsageError(f"--expires {text} is after 9999-12-31T23:59:59Z")
    return expires_at


def _allowed_models(text: str) -> list[str] | None:
    """``--models``: the comma-separated names or globs; none at all (``''``) means every
    model, for ``create`` and ``update`` alike (an empty list would let the key use none)."""
    models = [m for m in text.split(",") if m]
    return models or None


def _usage_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except _UsageError as exc:
            print(f"llmrouter: error: {exc}", file=sys.stderr)
            return 2

    return run


def _print_secret(key: Any, secret: str, args: argparse.Namespace, done: str) -> None:
    if args.format == "json":
        fields = {"id": key.id, "name": key.name, "prefix": key.prefix, "scopes": list(key.scopes)}
        print(json.dumps({**fields, "secret": secret}))
    else:
        print(f"{done} key {key.id} ({key.name}), scopes: {','.join(key.scopes)}")
        print(f"secret (shown once, store it now): {secret}")


@_usage_errors
def cmd_keys_create(args: argparse.Namespace) -> int:
    from llmrouter.accounting.keys import KeyStore

    expires_at = _expires_at(args.expires) if args.expires else None

    async def body(engine: Any) -> int:
        key, secret = await KeyStore(engine).create(
            args.name,
            scopes=args.scope or ["user"],
            allowed_models=_allowed_models(args.models) if args.models is not None else None,
            expires_at=expires_at,
            budget=args.budget,
            budget_period=args.budget_period,
            rpm=args.rpm,
            tpm=args.tpm,
            concurrency=args.concurrency,
            note=args.note,
        )
        _print_secret(key, secret, args, "created")
        return 0

    return _with_db(args, body)


_CLEARABLE = {
    "models": "allowed_models",
    "expires": "expires_at",
    "budget": "budget",
    "rpm": "rpm",
    "tpm": "tpm",
    "concurrency": "concurrency",
    "note": "note",
}
"""``--clear`` choices and the fields they empty."""


@_usage_errors
def cmd_keys_update(args: argparse.Namespace) -> int:

    given = {
        "name": args.name,
        "scopes": args.scope,
        "expires_at": _expires_at(args.expires) if args.expires else None,
        "budget": args.budget,
        "budget_period": args.budget_period,
        "rpm": args.rpm,
        "tpm": args.tpm,
        "concurrency": args.concurrency,
        "note": args.note,
    }
    changes: dict[str, Any] = {field: value for field, value in given.items() if value is not None}
    if args.models is not None:  # '' clears the list (None), which the line above would drop
        changes["allowed_models"] = _allowed_models(args.models)
    for option in args.clear or ():
        field = _CLEARABLE[option]
        if field in changes:
            raise _UsageError(f"--clear {option} and a new value for it")
        changes[field] = None
    if not changes:
        raise _UsageError("nothing to change: give a field's new value or --clear FIELD")

    async def body(engine: Any) -> int:
        async with _changing_keys(engine, args) as store:
            key = await store.update(args.key, changes)
        print(f"updated key {key.id} ({key.name}): {', '.join(sorted(changes))}")
        return 0

    return _with_db(args, body)


def cmd_keys_rotate(args: argparse.Namespace) -> int:

    async def body(engine: Any) -> int:
        async with _changing_keys(engine, args) as store:
            key, secret = await store.rotate(args.key)
        _print_secret(key, secret, args, "rotated")
        return 0

    return _with_db(args, body)


def cmd_keys_list(args: argparse.Namespace) -> int:
    import msgspec

    from llmrouter.accounting.keys import KeyStore

    async def body(engine: Any) -> int:
        keys = await KeyStore(engine).list(include_revoked=not args.active)
        if args.format == "json":
            print(json.dumps([{**msgspec.to_builtins(k), "state": k.state()} for k in keys], indent=2))
            return 0
        rows = [
            {
                "id": k.id,
                "name": k.name,
                "prefix": f"sk-llmr-{k.prefix}-",
                "scopes": ",".join(k.scopes),
                "models": ",".join(k.allowed_models) if k.allowed_models is not None else "*",
                "state": k.state(),
                "created": _when(k.created_at),
                "expires": _when(k.expires_at),
                "budget": f"{k.budget}/{k.budget_period}" if k.budget is not None else "-",
                "rpm/tpm/conc": "/".join("-" if n is None else str(n) for n in (k.rpm, k.tpm, k.concurrency)),
            }
            for k in keys
        ]
        print(_plain_table(rows), end="")
        return 0

    return _reading_db(args, body)


def _plain_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no keys)\n"
    headers = list(rows[0])
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(r[h].ljust(w) for h, w in zip(headers, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def cmd_keys_revoke(args: argparse.Namespace) -> int:

    async def body(engine: Any) -> int:
        async with _changing_keys(engine, args) as store:
            key = await store.revoke(args.key)
        print(f"revoked key {key.id} ({key.name}) at {_when(key.revoked_at)}")
        return 0

    return _with_db(args, body)


def cmd_usage_report(args: argparse.Namespace) -> int:
    from llmrouter.accounting.keys import KeyStore, shown_reference
    from llmrouter.accounting.reports import parse_range, render, report_columns, usage_report

    since, until = parse_range(args.since, args.until)

    async def body(engine: Any) -> int:
        key_id = None
        if args.key:
            key = await KeyStore(engine).get(args.key)
            if key is None:
                print(f"llmrouter: error: no API key {shown_reference(args.key)!r}", file=sys.stderr)
                return 1
            key_id = key.id
        by = args.by.split(",")
        rows = await usage_report(engine, by=by, since=since, until=until, key_id=key_id, end_user=args.user)
        sys.stdout.write(render(rows, args.format, columns=report_columns(by)))
        return 0

    return _reading_db(args, body)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from llmrouter.accounting.migrations import current_version, upgrade

    async def body(engine: Any) -> int:
        applied = await upgrade(engine)
        version = await current_version(engine)
        print(
            f"applied migrations {applied}; schema version {version}"
            if applied
            else f"up to date (schema version {version})"
        )
        return 0

    return _with_db(args, body, migrate=False)


def cmd_db_status(args: argparse.Namespace) -> int:
    from llmrouter.accounting.migrations import current_version, latest_version

    async def body(engine: Any) -> int:
        version, latest = await current_version(engine), latest_version()
        print(
            f"schema version {version} of {latest}"
            + ("" if version >= latest else " - run `llmrouter db upgrade`")
        )
        return 0 if version >= latest else 3

    return _reading_db(args, body, any_schema=True)


def _common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: don't overwrite a --config given to a parent parser with None.
    parser.add_argument("--config", "-c", default=argparse.SUPPRESS, help="config file")
    parser.add_argument(
        "--database-url", default=argparse.SUPPRESS, help="accounting database URL (wins over the config)"
    )


def _key_fields(parser: argparse.ArgumentParser, *, scope: str, models: str) -> None:
    """The options of a key's fields, for ``keys create`` and ``keys update``."""
    parser.add_argument("--scope", action="append", choices=["admin", "user"], help=scope)
    parser.add_argument("--models", help=f"comma-separated allowed model names or globs {models}")
    parser.add_argument("--expires", help="30d, 12h, or a date/time (UTC)")
    parser.add_argument("--budget", type=float, help="spend cap in USD")
    parser.add_argument("--budget-period", choices=["day", "month", "total"], default=None)
    parser.add_argument("--rpm", type=int)
    parser.add_argument("--tpm", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--note")


def register(subparsers: Any) -> None:
    """Add ``keys``, ``usage`` and ``db`` to the ``llmrouter`` command line."""
    keys = subparsers.add_parser(
        "keys", help="create, list, update, rotate and revoke API keys"
    ).add_subparsers(metavar="ACTION")
    create = keys.add_parser("create", help="create a key and print its secret (once)")
    create.add_argument("name")
    _key_fields(create, scope="repeatable (default: user)", models="(default: all)")
    create.add_argument("--format", choices=["text", "json"], default="text")
    create.set_defaults(func=cmd_keys_create)
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--active", action="store_true", help="hide revoked keys")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    listing.set_defaults(func=cmd_keys_list)
    change = keys.add_parser("update", help="change a key's fields; it keeps its secret and usage")
    change.add_argument("key", help="id, prefix or name")
    change.add_argument("--name", help="a new name")
    _key_fields(
        change, scope="repeatable: the new scopes", models="(the new list; '' allows every model again)"
    )
    change.add_argument(
        "--clear",
        action="append",
        choices=sorted(_CLEARABLE),
        help="repeatable: empty a field (budget: none of its own)",
    )
    change.set_defaults(func=cmd_keys_update)
    rotate = keys.add_parser(
        "rotate", help="give a key a new secret (printed once); the old one stops working"
    )
    rotate.add_argument("key", help="id, prefix or name")
    rotate.add_argument("--format", choices=["text", "json"], default="text")
    rotate.set_defaults(func=cmd_keys_rotate)
    revoke = keys.add_parser("revoke", help="revoke a key by id, prefix or name")
    revoke.add_argument("key")
    revoke.set_defaults(func=cmd_keys_revoke)

    usage = subparsers.add_parser("usage", help="usage and cost reports").add_subparsers(metavar="ACTION")
    report = usage.add_parser("report", help="usage grouped by key/model/provider/deployment/day/status/user")
    report.add_argument("--by", default="key,model", help="comma-separated dimensions (default: key,model)")
    report.add_argument("--since", help="2026-11-01, ISO time, today, or 7d/24h ago (inclusive)")
    report.add_argument("--until", help="as --since; a bare date includes that whole day")
    report.add_argument("--key", help="only this key (id, prefix or name)")
    report.add_argument("--user", help="only requests whose OpenAI `user` field is this")
    report.add_argument("--format", choices=["table", "csv", "json"], default="table")
    report.set_defaults(func=cmd_usage_report)

    db = subparsers.add_parser("db", help="accounting database schema").add_subparsers(metavar="ACTION")
    up = db.add_parser("upgrade", help="apply pending migrations (safe while replicas run)")
    up.set_defaults(func=cmd_db_upgrade)
    status = db.add_parser("status", help="show the schema version")
    status.set_defaults(func=cmd_db_status)
    for parser in (create, listing, change, rotate, revoke, report, up, status):
        _common(parser)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m llmrouter.accounting.cli``): ``llmrouter``'s own, which
    has these commands (a bad key reference or date is one line there, not a traceback)."""
    from llmrouter.cli import main as llmrouter_main

    return llmrouter_main(argv)


if __name__ == "__main__":
    sys.exit(main())
