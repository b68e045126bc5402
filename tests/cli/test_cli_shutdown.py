"""``llmrouter serve`` stopped with real signals: a second Ctrl-C, a stop during a
start-up stalled on PostgreSQL, SIGTERM while PostgreSQL has stopped answering, and
start-ups that fail on their database (one line, exit status 3)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmrouter.testing.upstream import FakeUpstream

from .conftest import free_port, llmrouter_command, write_config

MESSAGES: list[Any] = [{"role": "user", "content": "ping"}]


class Serve:
    """``llmrouter serve`` with its output in a file, read while it runs."""

    def __init__(self, config: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = config.parent / f"serve-{self.port}.log"
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                llmrouter_command(
                    "serve", "--config", str(config), "--port", str(self.port), "--no-access-log", *extra
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=config.parent,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_for_output(self, text: str, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while text not in self.output:
            assert self.process.poll() is None, self.output
            assert time.monotonic() < deadline, self.output
            time.sleep(0.05)

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.output
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.output
            time.sleep(0.1)

    def exit_status(self, within: float) -> tuple[int, float]:
        """The exit status, and how long it took (fails past ``within``)."""
        started = time.monotonic()
        try:
            status = self.process.wait(within)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"still running {within}s later:\n{self.output}")
        return status, time.monotonic() - started

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def serving() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for served in started:
        served.stop()


def test_a_second_ctrl_c_cuts_the_requests_records_them_and_exits_130(
    tmp_path: Path, serving: list[Serve]
) -> None:
    # Before: uvicorn skipped the app's shutdown, which ran under the event loop's final
    # cancellation instead (tracebacks: CancelledError, "Exception closing connection";
    # with PostgreSQL the rows stayed in the journal), and serve exited 0.
    with FakeUpstream(models=["mock-gpt"], chunks=100, delay_ms=50) as slow:  # a 5 s stream
        served = Serve(write_config(tmp_path / "llmrouter.yaml", slow.base_url))
        serving.append(served)
        served.wait_healthy()
        body = {"model": "mock-gpt", "messages": MESSAGES, "stream": True}
        with httpx.Client(base_url=served.url, timeout=30) as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                served.process.send_signal(signal.SIGINT)  # the drain starts (25 s)
                served.wait_for_output("Waiting for connections to close")
                served.process.send_signal(signal.SIGINT)  # no more waiting
                events = [line for line in lines if line.startswith("data:")]
            status, took = served.exit_status(within=15)
    assert status == 130, served.output
    assert took < 5
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "server_shutting_down"
    assert "forced exit" in served.output
    assert "Traceback" not in served.output and '"ERROR"' not in served.output
    with sqlite3.connect(tmp_path / "llmrouter.db") as db:
        rows = db.execute("SELECT status, completion_tokens FROM llmr_ledger").fetchall()
    assert len(rows) == 1 and rows[0][0] == "cancelled" and rows[0][1] > 0, rows
    assert not [p for p in (tmp_path / "llmrouter-journal").iterdir() if p.is_dir()]  # all written


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_during_a_start_up_stalled_on_the_database_takes_effect_at_once(
    tmp_path: Path, serving: list[Serve], silent_server: int, signum: int
) -> None:
    # Before: uvicorn acted on it once the start-up was over (asyncpg's 60 s connect
    # timeout), then exited 3, which a supervisor takes for a failure to restart.
    database = {"database": {"url": f"postgresql+asyncpg://llmrouter@127.0.0.1:{silent_server}/llmrouter"}}
    served = Serve(write_config(tmp_path / "llmrouter.yaml", "http://127.0.0.1:9/v1", accounting=database))
    serving.append(served)
    served.wait_for_output("Waiting for application startup")
    time.sleep(1)  # connecting, to a database that does not answer
    served.process.send_signal(signum)
    status, took = served.exit_status(within=20)
    assert took < 3, served.output
    # As any stop: killed by the SIGTERM uvicorn raises again; 0 after Ctrl-C.
    assert status == (-signal.SIGTERM if signum == signal.SIGTERM else 0), served.output
    assert "stop requested during start-up" in served.output
    assert "failed to start" not in served.output and "Traceback" not in served.output


def test_a_start_up_stalled_on_the_database_times_out_saying_where(
    tmp_path: Path, cli_command: Any, silent_server: int
) -> None:
    # Before: 63 s, then "accounting failed to start: CancelledError".
    url = f"postgresql+asyncpg://llmrouter@127.0.0.1:{silent_server}/llmrouter?connect_timeout=1"
    config = write_config(
        tmp_path / "llmrouter.yaml", "http://127.0.0.1:9/v1", accounting={"database": {"url": url}}
    )
    started = time.monotonic()
    done = _serve_until_it_exits(cli_command, config)
    assert time.monotonic() - started < 10
    assert done.returncode == 3, done.stderr
    where = f"postgresql://llmrouter@127.0.0.1:{silent_server}/llmrouter"
    assert (
        f"accounting failed to start: TimeoutError: timed out connecting to {where} after 1 s" in done.stderr
    )
    assert "Traceback" not in done.stderr


def test_a_sqlite_database_whose_folder_cannot_be_made_fails_in_one_line_with_status_3(
    tmp_path: Path, cli_command: Any
) -> None:
    # Before: exit status 1 after a 34-line FileNotFoundError traceback out of building the app.
    database = {"database": {"url": "sqlite+aiosqlite:////proc/nope/x.db"}}
    config = write_config(tmp_path / "llmrouter.yaml", "http://127.0.0.1:9/v1", accounting=database)
    done = _serve_until_it_exits(cli_command, config)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    failure = [line for line in done.stderr.splitlines() if "failed to start" in line]
    assert len(failure) == 1 and "/proc/nope" in failure[0] and "No such file or directory" in failure[0], (
        done.stderr
    )


# --- PostgreSQL that stops answering ------------------------------------------------


def _pg_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            return True
    except OSError:
        return False


def _pg_admin(sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture
def pg_database() -> Iterator[str]:
    if not _pg_up():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    name = f"llmr_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class FreezingProxy:
    """A TCP proxy to PostgreSQL, in threads; while frozen, no byte moves either way and
    no connection is refused (a network partition, a hung server)."""

    def __init__(self, target: int) -> None:
        self._target = target
        self._flowing = threading.Event()
        self._flowing.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._flowing.set()
        for sock in [self._listener, *self._sockets]:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._flowing.wait()
            server = socket.create_connection(("127.0.0.1", self._target))
            self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass


@pytest.mark.postgres
def test_sigterm_while_postgresql_does_not_answer_ends_within_its_bound_and_the_row_is_replayed(
    tmp_path: Path, serving: list[Serve], pg_database: str
) -> None:
    # Before: the ledger writer waited on its insert for good; the process outlived
    # SIGTERM and every Ctrl-C after it (125 s and counting).
    proxy = FreezingProxy(5432)
    try:
        with FakeUpstream(models=["mock-gpt"]) as fake:
            accounting = {
                "database": {"url": f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/{pg_database}"},
                "auth": {"enabled": False},
                "ledger": {"shutdown_timeout": 1},
            }
            config = write_config(
                tmp_path / "llmrouter.yaml", fake.base_url, accounting=accounting, server={"drain_seconds": 1}
            )
            served = Serve(config)
            serving.append(served)
            served.wait_healthy()
            proxy.freeze()
            reply = httpx.post(
                f"{served.url}/v1/chat/completions",
                json={"model": "mock-gpt", "messages": MESSAGES},
                timeout=30,
            )
            assert reply.status_code == 200  # answered; its row waits for the database
            time.sleep(0.5)  # the writer is in its insert, waiting for an answer
            served.process.send_signal(signal.SIGTERM)
            status, took = served.exit_status(within=30)
            assert status == -signal.SIGTERM
            assert took < 4, served.output  # shutdown_timeout 1 s, and the connections' close
            assert "1 rows not written at shutdown" in served.output
            proxy.thaw()
            # The next start replays the journal (here straight to PostgreSQL).
            accounting["database"] = {"url": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{pg_database}"}
            config = write_config(tmp_path / "llmrouter.yaml", fake.base_url, accounting=accounting)
            again = Serve(config)
            serving.append(again)
            again.wait_healthy()
            again.process.send_signal(signal.SIGTERM)
            assert again.exit_status(within=30)[0] == -signal.SIGTERM
    finally:
        proxy.close()

    async def rows() -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{pg_database}")
        try:
            return [tuple(r) for r in await conn.fetch("SELECT status, request_id FROM llmr_ledger")]
        finally:
            await conn.close()

    assert [status for status, _ in asyncio.run(rows())] == ["ok"]


def _serve_until_it_exits(cli_command: Any, config: Path) -> subprocess.CompletedProcess[str]:
    """``llmrouter serve`` with ``config``, run in its folder until it exits (start-up failed)."""
    return subprocess.run(
        cli_command("serve", "--config", str(config), "--port", str(free_port())),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
    )
