"""WAL mode for a SQLite file another process is holding."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from llmrouter import sqlite_wal
from llmrouter.sqlite_wal import enable_wal


def _held(path: Path) -> sqlite3.Connection:
    """A connection holding the file's exclusive lock (in rollback-journal mode)."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE IF NOT EXISTS t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def test_the_switch_is_retried_until_the_other_holder_lets_go(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    holder = _held(path)
    threading.Timer(0.3, holder.rollback).start()
    waiting = sqlite3.connect(path)
    enable_wal(waiting, busy_timeout_ms=0)  # no busy wait: SQLite says "locked" at once
    assert waiting.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert waiting.execute("PRAGMA busy_timeout").fetchone() == (0,)
    waiting.close()
    holder.close()


def test_it_gives_up_when_the_file_stays_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_wal, "_WAL_RETRY_SECONDS", 0.2)
    path = tmp_path / "db.sqlite"
    holder = _held(path)
    waiting = sqlite3.connect(path)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        enable_wal(waiting, busy_timeout_ms=0)
    waiting.close()
    holder.close()
