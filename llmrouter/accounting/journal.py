"""A crash-safe local journal for ledger rows not yet in the database.

Each ledger row is copied (one JSON line) into the current segment of this process
before :meth:`~llmrouter.accounting.ledger.LedgerWriter.record` returns - that is what
*acknowledged* means. A segment is a file of preallocated blocks mapped into memory
(``MAP_SHARED``), so an append is a memory copy, not a system call: the bytes are in
the kernel's page cache as soon as they are copied, exactly as after a ``write()``, so
the OS keeps them when the process dies (even ``kill -9``); only a machine crash within
the kernel's write-back delay can lose them. Preallocating (``posix_fallocate``) makes a
full disk fail the opening of a segment, with an error, instead of a write into the
mapping, which would kill the process. Segments whose rows are all in the database are
deleted.

A request in flight has a line too, a JSON array: what its row needs should the process
end before it does (:class:`~llmrouter.accounting.ledger.InFlight`).

Every process writes in its own folder under the journal directory and holds an
exclusive ``flock`` on it; at start-up, folders whose lock can be taken belong to dead
processes, and their rows are replayed (inserts are idempotent on ``entry_id``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["SEGMENT_BYTES", "Journal", "orphaned_rows"]

_encode_into = msgspec.json.Encoder().encode_into
"""A row as one line of compact JSON (UTF-8 bytes; msgspec: a quarter of ``json.dumps``),
into a buffer used again for every line: ~2k CPU instructions a line less than making a
``bytes`` of it and another with the newline."""
_LINE_KEPT = 1 << 16
"""The longest line whose buffer is kept for the next (a longer one's is let go)."""

SEGMENT_BYTES = 1 << 20
"""The size of a segment file (a bigger row gets a segment of its own size)."""


class Journal:
    """This process's journal folder: numbered segment files of JSON lines, each padded
    with zero bytes after its last line."""

    def __init__(self, root: str | Path, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.folder = self.root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.folder.mkdir()
        self._lock_fd = os.open(self.folder / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._segment_bytes = segment_bytes
        self.segment = 0
        self._oldest = 0  # the lowest segment not yet dropped
        self._map = self._open(self.segment, segment_bytes)
        self._used = 0
        self._line = bytearray()

    def _open(self, segment: int, size: int) -> mmap.mmap:
        fd = os.open(self.folder / f"{segment:08d}.jsonl", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            _preallocate(fd, size)
            return mmap.mmap(fd, size)  # shared: what is copied in is the file's content
        finally:
            os.close(fd)  # the mapping keeps the file open

    def append(self, row: object) -> int:
        """Copy one row in (a dict, or a Struct: one JSON object); returns the segment it went to."""
        line = self._line
        _encode_into(row, line)  # from its start, cut to what it wrote
        line.append(10)  # b"\n"
        size = len(line)
        if size > _LINE_KEPT:
            self._line = bytearray()
        end = self._used + size
        if end > len(self._map):
            self._next_segment(size)
            end = size
        self._map[self._used : end] = line
        self._used = end
        return self.segment

    def _next_segment(self, at_least: int) -> None:
        # The new segment first: when it cannot be made (a full disk), the journal stays
        # as it was, and the next append tries again.
        new_map = self._open(self.segment + 1, max(self._segment_bytes, at_least))
        self._map.close()
        self._map, self._used = new_map, 0
        self.segment += 1

    @property
    def oldest(self) -> int:
        """The lowest segment not yet dropped."""
        return self._oldest

    def drop_before(self, segment: int) -> None:
        """Delete the segments numbered below ``segment`` (all their rows are committed).

        Only full segments are ever dropped: starting a segment for every batch written
        cost a file's creation, preallocation and deletion per batch. After a crash, the
        rows of the last segments that were already written are replayed again, which
        inserts nothing twice (``entry_id`` is unique)."""
        end = min(segment, self.segment)  # never the segment in use
        for number in range(self._oldest, end):
            (self.folder / f"{number:08d}.jsonl").unlink(missing_ok=True)
        self._oldest = max(self._oldest, end)

    def close(self, *, committed: bool) -> None:
        """Release the folder; delete it when every row is committed, else leave it for
        the next start to replay."""
        self._map.close()
        if committed:
            shutil.rmtree(self.folder, ignore_errors=True)
        os.close(self._lock_fd)


def _preallocate(fd: int, size: int) -> None:
    """Reserve the blocks of ``size`` bytes now (an error here, not a crash later)."""
    allocate = getattr(os, "posix_fallocate", None)  # not on macOS
    if allocate is not None:
        try:
            allocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
    os.pwrite(fd, bytes(size), 0)  # writing zeros allocates them everywhere


def _read_rows(folder: Path) -> Iterator[Any]:
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_bytes().rstrip(b"\x00").splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                continue  # a torn last line from a crash mid-write: that row was never acknowledged


def orphaned_rows(root: str | Path) -> list[tuple[Path, list[Any], int]]:
    """Folders left by dead processes: ``(folder, rows, lock_fd)``; the caller replays the
    rows, then calls :func:`release_orphan`. The lock is held meanwhile so that two
    starting replicas don't replay the same folder twice."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            fd = os.open(folder / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live process owns it
            continue
        found.append((folder, list(_read_rows(folder)), fd))
    return found


def release_orphan(folder: Path, fd: int, *, replayed: bool) -> None:
    if replayed:
        shutil.rmtree(folder, ignore_errors=True)
    os.close(fd)
