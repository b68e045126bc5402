"""Child processes for the gateway benchmark: the fake upstream and ``llmrouter serve``,
pinned to one core, with their CPU time and memory read from ``/proc``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["Child", "child_environment", "free_port", "pin_self", "pinned"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The cores this process may use, read once at import: pin_self() narrows the process's
# own affinity to the load generator's core, and the children must still go on the first.
_CORES: tuple[int, ...] = tuple(sorted(os.sched_getaffinity(0)))


def pin_self(core_index: int) -> None:
    """Pin this process to one core (the load generator's), when there are two or more."""
    if len(_CORES) > 1:
        os.sched_setaffinity(0, {_CORES[core_index % len(_CORES)]})


@contextmanager
def pinned(core_index: int) -> Iterator[None]:
    """:func:`pin_self` for the ``with`` block, then the cores this process had: what runs
    next in the process (the provider bench, torch's threads) gets them all again."""
    previous = os.sched_getaffinity(0)
    pin_self(core_index)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a benched server, less llmrouter's overrides
    (``LLMROUTER__SECTION__KEY``, ``LLMROUTER_TRANSFORMERS_MODEL``), plus ``extra``: the
    bench's configs say what its servers run with, and an override left in the shell
    would change what is measured (``LLMROUTER__SERVER__WORKERS=2``: the CPU and RSS of
    uvicorn's supervisor, not of the server; a model loaded into every gateway)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("LLMROUTER__") and name != "LLMROUTER_TRANSFORMERS_MODEL"
    }
    return {**env, **(extra or {})}


class Child:
    """A server process pinned (before exec) to the first core, waited for until it listens."""

    def __init__(
        self, argv: Sequence[str], port: int, *, env: dict[str, str] | None = None, log: Path | None = None
    ) -> None:
        self.argv, self.port = list(argv), port
        core = {_CORES[0]}  # the first: never the load generator's
        self._log: IO[bytes] | None = open(log, "wb") if log else None  # closed in stop()
        self.process = subprocess.Popen(
            self.argv,
            env=child_environment(env),
            stdout=self._log if self._log is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.sched_setaffinity(0, core),  # before exec: inherited by every thread
        )

    def wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.process.returncode} before listening")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"{' '.join(self.argv)} did not listen on {self.port} within {timeout:.0f}s")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def rss_mb(self) -> float:
        """Resident memory in MB (10^6 bytes; /proc says kB, that is KiB)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
        return float("nan")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]
