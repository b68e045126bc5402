"""Accounting against hostile or odd values: a client-chosen string or an upstream's
number must never poison a ledger batch, and key creation refuses what the database or
the budget arithmetic cannot hold (400, never a 500 or a key that breaks every request).
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import select

from llmrouter.accounting import Accounting, entry
from llmrouter.accounting.budgets import to_units
from llmrouter.accounting.entry import _fit, as_entry, storable, storable_values
from llmrouter.accounting.ledger import LedgerWriter, insert_rows
from llmrouter.accounting.models import LedgerRow
from llmrouter.errors import BudgetExceededError, InvalidRequestError

from .conftest import make_config

pytestmark = pytest.mark.anyio

_LEDGER: Any = LedgerRow.__table__  # type: ignore[attr-defined]


def _row(**fields: Any) -> dict[str, Any]:
    return {
        "entry_id": uuid.uuid4().hex,
        "request_id": "req-1",
        "created_at": 1_790_000_000.0,
        "day": "2026-09-21",
        "status": "error",
        **fields,
    }


async def test_client_strings_and_upstream_numbers_do_not_poison_the_ledger(
    db_url: str, tmp_path: Path
) -> None:
    # model_group is what the client asked for (an unknown model is still a row), the
    # error code and upstream model come from the upstream: none is bounded upstream of here.
    hostile = _row(
        model_group="m" * 5000,
        upstream_model="up\x00stream",
        error_code="E" * 1000,
        prompt_tokens=2**40,
        completion_tokens=-(2**40),
    )
    normal = _row(model_group="gpt-4o-mini", prompt_tokens=3)
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        await insert_rows(acct.engine, [hostile, normal])
        async with acct.engine.connect() as conn:
            rows = (await conn.execute(select(_LEDGER).order_by(_LEDGER.c.id))).mappings().all()
    assert len(rows) == 2
    stored = rows[0]
    assert stored["model_group"] == "m" * 200
    assert stored["upstream_model"] == "upstream"
    assert stored["error_code"] == "E" * 100
    assert stored["prompt_tokens"] == 2**31 - 1 and stored["completion_tokens"] == 0
    assert rows[1]["model_group"] == "gpt-4o-mini"


async def test_writer_keeps_flowing_after_a_hostile_row(db_url: str, tmp_path: Path) -> None:
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        writer: LedgerWriter = acct.ledger
        writer.record(_row(model_group="a\x00b" + "x" * 300))
        writer.record(_row(model_group="after"))
        await writer.flush()  # raised (and stalled every later row) before the fix
        assert writer.pending == 0 and writer.failures == 0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "a\x00b"}, "name"),
        ({"name": "line\r\nbreak"}, "name"),
        ({"rpm": 2**63}, "rpm"),
        ({"rpm": 0}, "rpm"),
        ({"tpm": -1}, "tpm"),
        ({"concurrency": -5}, "concurrency"),
        ({"budget": 1e300}, "budget"),
        ({"budget": math.inf}, "budget"),
        ({"budget": math.nan}, "budget"),
        ({"expires_at": math.inf}, "expires_at"),
        ({"expires_at": math.nan}, "expires_at"),
        ({"allowed_models": ["a,b"]}, "allowed_models"),
        ({"allowed_models": ["a\x00b"]}, "allowed_models"),
        ({"allowed_models": ["m" * 201]}, "allowed_models"),
        ({"allowed_models": [f"m{i}" for i in range(1001)]}, "allowed_models"),
        ({"note": "a\x00b"}, "note"),
        ({"note": "n" * 10_001}, "note"),
    ],
)
async def test_key_creation_refuses_what_cannot_be_stored_or_used(
    db_url: str, tmp_path: Path, fields: dict[str, Any], param: str
) -> None:
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        fields = dict(fields)  # the parameter is shared by the sqlite and postgres runs
        name = fields.pop("name", "k")
        with pytest.raises(InvalidRequestError) as info:
            await acct.keys.create(name, **fields)
        assert info.value.param == param
        assert await acct.keys.list() == []


async def test_largest_accepted_values_still_work(db_url: str, tmp_path: Path) -> None:
    async with Accounting(make_config(db_url, tmp_path)) as acct:
        key, secret = await acct.keys.create(
            "n" * 200, rpm=2**31 - 1, tpm=2**31 - 1, concurrency=2**31 - 1, budget=1e9
        )
        assert (await acct.authenticate(secret)).id == key.id
        assert acct.budgets is not None
        assert (await acct.budgets.status(key))[0]["limit"] == 1e9
        # A request whose most cost is absurd is refused as over budget, not a 500.
        with pytest.raises(BudgetExceededError):
            await acct.budgets.reserve(key, "m", 1e300, "req-1")


def test_to_units_saturates_instead_of_overflowing() -> None:
    # A price table or budget far out of range must not turn into an OverflowError (a 500
    # on every request of that key) nor exceed what a BIGINT column holds.
    assert to_units(math.inf) == to_units(1e300) == to_units(1e300, round_up=True)
    assert 0 < to_units(1e300) < 2**62
    assert to_units(math.nan) == 0
    assert to_units(1.5) == 1_500_000_000


@pytest.mark.parametrize(
    ("fields", "fits"),
    [
        ({}, True),
        ({"model_group": "m" * 200, "prompt_tokens": 2**31 - 1}, True),
        ({"prompt_tokens": 3.0, "error_code": 7}, False),  # other types: value by value, kept
        ({"model_group": "m" * 201}, False),
        ({"upstream_model": "up\x00stream"}, False),
        ({"completion_tokens": -1}, False),
        ({"prompt_tokens": 2**31}, False),
        ({"attempts": None}, False),  # not an int: looked at value by value (and kept)
    ],
)
def test_rows_that_fit_are_passed_through_and_others_fitted(fields: dict[str, Any], fits: bool) -> None:
    # storable passes a row that fits as it is, without fitting each value: it must
    # agree with fitting each value, and never change the row it was given.
    row = as_entry(_row(**fields))
    original = msgspec.structs.replace(row)
    [cleaned] = storable([row])
    assert cleaned == _fit(original)
    assert row == original
    assert (cleaned is row) == fits
    # The SQLite insert's values: the same, in column order.
    assert storable_values([row]) == [msgspec.structs.astuple(cleaned)]


def test_a_remembered_combination_still_checks_each_rows_own_values() -> None:
    # The strings that repeat from row to row (model, deployment, status...) are
    # remembered once they fit; the request's own ids and the counts are checked every time.
    fitting = as_entry(_row(model_group="g"))
    assert storable([fitting])[0] is fitting
    for fields in (
        {"request_id": "r" * 201},
        {"request_id": "r\x00"},
        {"entry_id": "e" * 41},
        {"entry_id": "e\x00"},
        {"prompt_tokens": -5},
        {"cached_tokens": 2**31},
        {"attempts": 2**40},
    ):
        row = as_entry(_row(model_group="g", **fields))
        [cleaned] = storable([row])
        assert cleaned is not row and cleaned == _fit(row)


def test_unhashable_values_are_left_to_the_database_and_memory_is_bounded() -> None:
    row = as_entry(_row(model_group=["not", "a", "string"]))
    [cleaned] = storable([row])
    assert cleaned == _fit(row) == row  # refused by the database, then set aside
    for n in range(entry._FITTING_MEMORY + 100):
        storable([as_entry(_row(model_group=f"group-{n}"))])
    assert 0 < len(entry._fitting) <= entry._FITTING_MEMORY
