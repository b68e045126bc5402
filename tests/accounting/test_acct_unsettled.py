"""Settlements waiting for their store outlive the process: a budget settlement the store
failed waits in the retries, and is journaled; should the process end before the store
comes back (killed, or shut down while it is still down), the next start settles it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from llmrouter.accounting import Accounting
from llmrouter.accounting.budgets import to_units
from llmrouter.accounting.config import AccountingConfig, LimitsConfig

from .conftest import finish, killed_script, run_killed
from .test_acct_interrupted import (
    COST,
    EVERY_STORE,
    PROMPT_COST,
    _budget,
    _config,
    _context,
    _rows,
    config_on,
)

pytestmark = pytest.mark.anyio


class Outage:
    """The budget store fails every settlement while ``down``, as with Redis or the
    database unreachable (the retries call the same method, and go through once up)."""

    def __init__(self, acct: Accounting) -> None:
        assert acct.budgets is not None
        store = acct.budgets.store
        working = store.settle
        self.down = True

        async def settle(*args: Any, **kwargs: Any) -> int:
            if self.down:
                raise ConnectionError("the store is down")
            return await working(*args, **kwargs)

        store.settle = settle  # type: ignore[method-assign]


_KILLED = """
    async def main():
        acct = await started()
        Outage(acct)
        for i in range(3 + RUNNING):
            ctx = _context(f"run-{i}")
            await acct.hooks.before_request(ctx)
            if i < 3:
                await acct.hooks.after_request(finish(ctx, cost=COST))
        await acct.ledger.flush()
        print("waiting", len(acct.retries), "running", acct.hooks.in_flight, flush=True)
        os._exit(9)  # killed before the store came back
"""


def _killed(config: AccountingConfig, *, running: int = 0) -> str:
    """The script of a process killed with three settlements waiting for the store, and
    ``running`` requests in flight."""
    return killed_script(_KILLED.replace("RUNNING", str(running)), config)


@EVERY_STORE  # memory: counters seeded from the ledger, right before this change too
async def test_settlements_a_killed_process_left_waiting_are_settled_at_the_next_start(
    db: str, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        config = await config_on(stack, db, backend, tmp_path, request)
        assert "waiting 3 running 0" in await run_killed(_killed(config), tmp_path)
        async with Accounting(config) as restarted:
            rows = await _rows(restarted)
            spent, reserved = await _budget(restarted)
    assert sorted(rows) == ["run-0", "run-1", "run-2"]
    assert all(row["status"] == "ok" and row["cost"] == pytest.approx(COST) for row in rows.values())
    # Without the journaled settlements: nothing spent and 3 x the maximum cost reserved
    # until the leases end (then given back: the key's spend lost for the window).
    assert (spent, reserved) == (to_units(3 * COST), 0)


async def test_a_shutdown_with_the_store_still_down_leaves_them_to_the_next_start(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Settlements that wait, and the reservations of requests still running (recorded
    as interrupted by the shutdown, which cannot settle them either)."""
    config = _config(sqlite_url, tmp_path, "database", None)
    async with Accounting(config) as acct:
        Outage(acct)
        for i in range(4):
            ctx = _context(f"run-{i}")
            await acct.hooks.before_request(ctx)
            if i < 2:
                await acct.hooks.after_request(finish(ctx, cost=COST))
    # The shutdown's last try failed too: the journal stays for the next start (before,
    # with only the running requests' holds to settle, it was deleted: they were lost).
    assert list((tmp_path / "journal").iterdir())
    async with Accounting(config) as restarted:
        rows = await _rows(restarted)
        spent, reserved = await _budget(restarted)
    assert [rows[f"run-{i}"]["status"] for i in range(4)] == ["ok"] * 2 + ["interrupted"] * 2
    assert (spent, reserved) == (to_units(2 * COST + 2 * PROMPT_COST), 0)
    assert not list((tmp_path / "journal").iterdir())  # replayed, then released


async def test_settlements_that_went_through_are_not_counted_again(sqlite_url: str, tmp_path: Path) -> None:
    config = _config(sqlite_url, tmp_path, "database", None)
    acct = Accounting(config)
    await acct.start()
    outage = Outage(acct)
    ctx = _context("run-0")
    await acct.hooks.before_request(ctx)
    await acct.hooks.after_request(finish(ctx, cost=COST))
    assert len(acct.ledger._unsettled) == 1
    outage.down = False
    assert await acct.retries.try_all()
    assert not acct.ledger._unsettled  # the lines may go once every settlement went through
    await acct.ledger.flush()
    journal = acct.ledger._journal
    assert journal is not None
    journal.close(committed=False)  # killed now: its folder, with the line, is replayed
    await acct.engine.dispose()
    async with Accounting(config) as restarted:
        spent, reserved = await _budget(restarted)
    assert (spent, reserved) == (to_units(COST), 0)  # once, though its line was replayed


def test_a_replayed_settlement_line_settles_its_hold_once_and_loses_no_row() -> None:
    from llmrouter.accounting.in_flight import PROCESS_EXITED, InFlight, rows_to_replay

    def line(entry_id: str, unsettled_cost: float | None = None) -> Any:
        request = InFlight(
            entry_id, f"req-{entry_id}", 1.0, None, "chat", False, "g", 10, 0.1, True, None, None
        )
        return msgspec.json.decode(
            msgspec.json.encode(msgspec.structs.replace(request, unsettled_cost=unsettled_cost))
        )

    finished = msgspec.json.decode(msgspec.json.encode(InFlight(*line("b")[:12]).row(PROCESS_EXITED)))
    finished["status"] = "ok"
    rows, interrupted, unsettled = rows_to_replay([line("a"), line("b"), finished, line("b", 0.5)])
    assert [(row.entry_id, row.status) for row in rows] == [("b", "ok"), ("a", "interrupted")]
    assert [i.row.entry_id for i in interrupted] == ["a"]
    assert [(u.request_id, u.unsettled_cost) for u in unsettled] == [("req-b", 0.5)]
    # Its row not in the journal (inserted, its segment dropped; or the process died
    # between the two lines): the interrupted row goes in (over nothing the database has),
    # and the hold is still settled once, to the line's cost.
    rows, interrupted, unsettled = rows_to_replay([line("b"), line("b", 0.5)])
    assert [(row.entry_id, row.status) for row in rows] == [("b", "interrupted")]
    assert not interrupted and [u.unsettled_cost for u in unsettled] == [0.5]
    # A line of the release before (no unsettled_cost) still reads.
    assert len(line("c")) == 13 and rows_to_replay([line("c")[:12]])[0][0].entry_id == "c"


_STARTED_WITH_THE_STORE_DOWN = """
    from llmrouter.accounting.budget_stores import DatabaseBudgetStore, RedisBudgetStore

    async def down(*args, **kwargs):
        raise ConnectionError("the store is down")

    async def main():
        DatabaseBudgetStore.settle = RedisBudgetStore.settle = down
        acct = await started()
        print("waiting", len(acct.retries), flush=True)
        os._exit(9)  # killed again before the store came back
"""


@EVERY_STORE
async def test_what_a_start_replays_and_cannot_settle_survives_its_death_too(
    db: str, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A replica killed with settlements waiting and requests running; the next one
    starts while the store is still down, and is killed too; the third settles all."""
    async with contextlib.AsyncExitStack() as stack:
        config = await config_on(stack, db, backend, tmp_path, request)
        assert "waiting 3 running 2" in await run_killed(_killed(config, running=2), tmp_path)
        # A store in memory holds nothing of another process's: nothing to settle there.
        waiting = "waiting 0" if backend == "memory" else "waiting 5"
        assert waiting in await run_killed(killed_script(_STARTED_WITH_THE_STORE_DOWN, config), tmp_path)
        async with Accounting(config) as restarted:
            rows = await _rows(restarted)
            spent, reserved = await _budget(restarted)
    assert [rows[f"run-{i}"]["status"] for i in range(5)] == ["ok"] * 3 + ["interrupted"] * 2
    # Before, the second start dropped the first one's journal once its rows were in:
    # nothing spent, 5 x the maximum cost reserved until the leases end.
    assert (spent, reserved) == (to_units(3 * COST + 2 * PROMPT_COST), 0)
    assert len(list((tmp_path / "journal").iterdir())) == 0


_KILLED_RELEASING_ITS_LIMITS = """
    async def main():
        acct = await started()
        Outage(acct)

        async def release(*args, **kwargs):  # the limits' store is down too: it times out
            await anyio.sleep(3600)

        acct.limiter.release = release
        ctx = _context("run-0")
        await acct.hooks.before_request(ctx)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(acct.hooks.after_request, finish(ctx, cost=COST))
            await anyio.sleep(0.3)
            print("releasing", flush=True)
            os._exit(9)  # killed while the release waits
"""


async def test_a_process_killed_while_its_limits_wait_to_be_released_loses_no_row(
    sqlite_url: str, tmp_path: Path
) -> None:
    config = msgspec.structs.replace(
        _config(sqlite_url, tmp_path, "database", None), limits=LimitsConfig(concurrency=2)
    )
    assert "releasing" in await run_killed(killed_script(_KILLED_RELEASING_ITS_LIMITS, config), tmp_path)
    async with Accounting(config) as restarted:
        rows = await _rows(restarted)
        spent, reserved = await _budget(restarted)
    # Before, the settlement's line went into the journal ahead of the row, and a replay
    # takes such a line for a request whose row it has: the row was lost.
    assert (rows["run-0"]["status"], rows["run-0"]["cost"]) == ("ok", pytest.approx(COST))
    assert (spent, reserved) == (to_units(COST), 0)
