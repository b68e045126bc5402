"""The series of several workers in one scrape (``llmrouter.telemetry.workers``)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from llmrouter.telemetry.prometheus import PrometheusMetrics
from llmrouter.telemetry.workers import WorkerMetrics


def _worker(folder: Path, pid: int, requests: int) -> tuple[WorkerMetrics, Counter]:
    registry = CollectorRegistry()
    counter = Counter("requests", "Requests.", ["route"], registry=registry)
    counter.labels("/v1/chat/completions").inc(requests)
    Histogram("latency_seconds", "Latency.", registry=registry, unit="seconds").observe(0.2)
    Gauge("in_flight", "In flight.", registry=registry).set(pid % 7)
    return WorkerMetrics(folder, registry, pid=pid), counter


def _samples(body: bytes) -> dict[tuple[str, str], float]:
    return {
        (sample.name, sample.labels["worker"]): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if "le" not in sample.labels and not sample.name.endswith("_created")
    }


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_every_live_workers_series_once_labelled_by_worker(tmp_path: Path) -> None:
    me, parent, dead = os.getpid(), os.getppid(), _dead_pid()
    mine, _ = _worker(tmp_path, me, 5)
    theirs, _ = _worker(tmp_path, parent, 7)
    gone, _ = _worker(tmp_path, dead, 100)
    for worker in (mine, theirs, gone):
        worker.publish()

    body = generate_latest(mine.registry)
    samples = _samples(body)
    assert samples[("requests_total", str(me))] == 5
    assert samples[("requests_total", str(parent))] == 7
    assert samples[("latency_seconds_count", str(parent))] == 1
    assert samples[("in_flight", str(me))] == me % 7
    assert str(dead) not in {worker for _, worker in samples}
    assert not gone.path.exists()  # a dead worker's file is dropped
    # one family header for both workers, in either format
    assert body.count(b"# TYPE requests_total counter") == 1
    openmetrics = generate_openmetrics(theirs.registry)
    assert openmetrics.count(b"# TYPE requests counter") == 1 and openmetrics.endswith(b"# EOF\n")


def test_the_service_registry_with_a_workers_folder(tmp_path: Path) -> None:
    metrics = PrometheusMetrics(workers_dir=str(tmp_path))
    try:
        body, content_type = metrics.render()
        assert content_type.startswith("text/plain")
        assert f'process_resident_memory_bytes{{worker="{os.getpid()}"}}'.encode() in body
        assert (tmp_path / f"{os.getpid()}.msgpack").exists()
    finally:
        metrics.shutdown()
    assert not (tmp_path / f"{os.getpid()}.msgpack").exists()  # out of the others' scrapes


def test_a_snapshot_that_cannot_be_written_leaves_the_last_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    worker, counter = _worker(tmp_path, os.getpid(), 3)
    worker.publish()
    counter.labels("/v1/chat/completions").inc()
    worker.path.with_suffix(".partial").mkdir()  # the write fails, as on a full disk
    for _ in range(3):
        worker.publish()
        assert _samples(generate_latest(worker.registry))[("requests_total", str(os.getpid()))] == 3
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    worker.path.with_suffix(".partial").rmdir()
    worker.publish()
    assert _samples(generate_latest(worker.registry))[("requests_total", str(os.getpid()))] == 4
