"""``/metrics`` of a multi-worker ``llmrouter serve``: every worker's series, whichever
worker the scrape reaches.

uvicorn's workers share one listening socket, so each scrape lands on one of them, and a
worker only knows its own counters: with two workers, successive scrapes of one server
read 236 and then 164 requests, which Prometheus takes for counter resets. Here each
worker writes a snapshot of its registry to a file of its own in a folder the parent
made (``LLMROUTER_METRICS_DIR``), every second and before it answers a scrape, and the
scrape answers with the series of every live worker's latest snapshot, each labelled
``worker="<pid>"`` (sum them in queries: ``sum without (worker) (rate(...))``).

A series only ever comes from its own worker's newest snapshot, so it never goes
backwards between scrapes, whichever worker answers. The files of workers that died are
dropped (uvicorn starts a new worker, with a new pid, in their place).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["WORKER_LABEL", "WorkerMetrics"]

WORKER_LABEL = "worker"

log = logging.getLogger("llmrouter.telemetry")

_SUFFIX = ".msgpack"
# One family: name, help, type, unit, samples as (name, labels, value, timestamp).
_Family = tuple[str, str, str, str, list[tuple[str, dict[str, str], float, Any]]]
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[_Family]).decode


class WorkerMetrics:
    """One worker's view of the shared folder.

    Args:
        folder: the folder every worker of the server writes to (it exists).
        registry: this worker's own registry, the one its snapshots are taken of.
        pid: this worker's process id (its file's name and its ``worker`` label).
    """

    def __init__(self, folder: str | Path, registry: CollectorRegistry, *, pid: int | None = None) -> None:
        self.folder = Path(folder)
        self.own = registry
        self.pid = os.getpid() if pid is None else pid
        self.path = self.folder / f"{self.pid}{_SUFFIX}"
        self._failing = False
        self.registry = CollectorRegistry(auto_describe=False)
        """Every worker's series: what the scrape encodes."""
        self.registry.register(_Snapshots(self.folder))

    def publish(self) -> None:
        """Write this worker's snapshot (in full, then renamed into place: a reader never
        sees half of one). When it cannot be written (a full disk), the others keep
        showing the last one; a warning says so once, and another line when it works
        again."""
        try:
            self._write()
        except OSError as exc:
            if not self._failing:
                log.warning(
                    "telemetry: sharing this worker's metrics failed (%s); scrapes show older ones", exc
                )
            self._failing = True
            return
        if self._failing:
            log.info("telemetry: sharing this worker's metrics works again")
            self._failing = False

    def _write(self) -> None:
        families = [
            (
                family.name,
                family.documentation,
                family.type,
                family.unit,
                [(sample.name, sample.labels, sample.value, sample.timestamp) for sample in family.samples],
            )
            for family in self.own.collect()
        ]
        partial = self.path.with_suffix(".partial")
        partial.write_bytes(_encode(families))
        os.replace(partial, self.path)

    def remove(self) -> None:
        """Take this worker's series out of the scrape (it is shutting down)."""
        self.path.unlink(missing_ok=True)


class _Snapshots(Collector):
    """The families of every live worker's snapshot, merged by name."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for pid, families in self._snapshots():
            for name, documentation, kind, unit, samples in families:
                family = merged.get(name)
                if family is None:
                    family = merged[name] = Metric(name, documentation, kind, unit)
                for sample_name, labels, value, timestamp in samples:
                    family.add_sample(sample_name, {**labels, WORKER_LABEL: pid}, value, timestamp)
        yield from merged.values()

    def _snapshots(self) -> Iterator[tuple[str, list[_Family]]]:
        for path in sorted(self.folder.glob(f"*{_SUFFIX}")):
            pid = path.name.removesuffix(_SUFFIX)
            if not _alive(int(pid)):
                path.unlink(missing_ok=True)
                continue
            try:
                snapshot = path.read_bytes()
            except FileNotFoundError:  # its worker just shut down
                continue
            yield pid, _decode(snapshot)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: the pid was reused, but it lives
        return True
    return True
