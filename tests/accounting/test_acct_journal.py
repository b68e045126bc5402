"""The ledger journal: rows copied into memory-mapped segment files, replayed after a crash."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmrouter.accounting.journal import Journal, orphaned_rows, release_orphan


def test_rows_fill_segments_and_a_new_one_starts_when_one_is_full(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=256)
    segments = [journal.append({"i": i, "pad": "x" * 40}) for i in range(20)]
    assert segments == sorted(segments) and segments[-1] >= 3  # ~4 rows fit in 256 bytes
    big = journal.append({"i": 20, "pad": "y" * 1000})  # bigger than a segment: one of its own
    assert big == segments[-1] + 1
    journal.close(committed=False)
    ((folder, rows, fd),) = orphaned_rows(tmp_path)
    release_orphan(folder, fd, replayed=False)
    assert [row["i"] for row in rows] == list(range(21))
    assert all(path.stat().st_size >= 256 for path in folder.glob("*.jsonl"))  # preallocated


def test_only_segments_before_the_given_one_are_dropped_never_the_current(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=64)
    segments = [journal.append({"i": i, "pad": "x" * 30}) for i in range(4)]  # one row each
    assert segments == [0, 1, 2, 3]
    journal.drop_before(2)
    assert sorted(p.name for p in journal.folder.glob("*.jsonl")) == ["00000002.jsonl", "00000003.jsonl"]
    journal.drop_before(99)  # everything committed: the segment in use stays
    assert [p.name for p in journal.folder.glob("*.jsonl")] == ["00000003.jsonl"]
    journal.close(committed=True)
    assert not journal.folder.exists()


def test_a_row_copied_in_survives_kill_9_and_a_torn_one_is_skipped(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os
        from llmrouter.accounting.journal import Journal
        journal = Journal({str(tmp_path)!r})
        for i in range(3):
            journal.append({{"i": i}})
        # what a kill in the middle of a copy leaves: a line without its end
        journal._map[journal._used : journal._used + 5] = b'{{"i":'
        os.kill(os.getpid(), 9)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == -9
    ((folder, rows, fd),) = orphaned_rows(tmp_path)
    release_orphan(folder, fd, replayed=True)
    assert rows == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert not folder.exists()


def test_without_fallocate_segments_are_allocated_by_writing_zeros(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "posix_fallocate", raising=False)  # as on macOS
    journal = Journal(tmp_path, segment_bytes=4096)
    journal.append({"i": 0})
    journal.close(committed=False)
    ((folder, rows, fd),) = orphaned_rows(tmp_path)
    release_orphan(folder, fd, replayed=False)
    assert rows == [{"i": 0}] and (folder / "00000000.jsonl").stat().st_size == 4096


def test_a_segment_that_cannot_be_made_leaves_the_journal_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path, segment_bytes=64)
    journal.append({"i": 0, "pad": "x" * 30})

    def disk_full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(os, "posix_fallocate", disk_full)
        with pytest.raises(OSError):
            journal.append({"i": 1, "pad": "x" * 30})  # needs a new segment: none can be made
    assert journal.append({"i": 2, "pad": "x" * 30}) == 1  # space again: the next one works
    journal.close(committed=False)
    ((folder, rows, fd),) = orphaned_rows(tmp_path)
    release_orphan(folder, fd, replayed=False)
    assert [row["i"] for row in rows] == [0, 2]
