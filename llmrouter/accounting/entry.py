"""A ledger row as the writer holds it, and making it storable.

:class:`LedgerEntry` has the ledger table's columns (``id`` aside), in the table's
order, which is the order the SQLite insert binds them in. It is a ``msgspec`` Struct,
not a dict: made for every request, a dict of 23 keys cost ~10k CPU instructions to
build and ~5k to check for completeness before each insert; the Struct is complete by
construction and costs ~3k. Journal lines stay JSON objects, keyed by column name.

Some values come from clients (the model name asked for, kept even when unknown) or
upstreams (model, error code, token counts). PostgreSQL refuses a string over its
VARCHAR length, a NUL byte or an INTEGER past int32, and one refused row would fail its
whole batch on every retry, stalling the ledger for good: :func:`storable` fits them.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import BigInteger, Integer, String

from llmrouter.accounting.models import LedgerRow

__all__ = ["FIELDS", "LedgerEntry", "as_entry", "storable", "storable_values", "utc_day"]


class LedgerEntry(msgspec.Struct, gc=False):
    """One ledger row (the columns of :class:`~llmrouter.accounting.models.LedgerRow`)."""

    entry_id: str
    request_id: str
    created_at: float
    day: str
    api_key_id: str | None = None
    operation: str = "chat"
    stream: bool = False
    model_group: str | None = None
    deployment: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: float = 0.0
    cost_source: str | None = None
    usage_estimated: bool = False
    cache_status: str | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    status: str = "ok"
    error_code: str | None = None
    attempts: int = 0
    end_user: str | None = None


FIELDS: tuple[str, ...] = LedgerEntry.__struct_fields__
"""The columns, in the order :func:`storable_values` gives their values."""

_TABLE: Any = LedgerRow.__table__  # type: ignore[attr-defined]
_COLUMNS = {c.name: c for c in _TABLE.columns if c.name != "id"}
if tuple(_COLUMNS) != FIELDS:  # pragma: no cover - a schema change must change both
    raise RuntimeError(f"LedgerEntry's fields {FIELDS} are not the ledger's columns {tuple(_COLUMNS)}")

_REQUIRED = {name: None for name in FIELDS[: len(FIELDS) - len(LedgerEntry.__struct_defaults__)]}
"""The fields without a default: a row that lacks one gets NULL, which the database refuses
(the row is then set aside, see :mod:`llmrouter.accounting.ledger`)."""

# (position, most characters or None) of each string column; (position, largest value)
# of each integer column (counts are never negative).
_STR_LIMITS: tuple[tuple[int, int | None], ...] = tuple(
    (i, getattr(c.type, "length", None))
    for i, c in enumerate(_COLUMNS.values())
    # SQLModel's AutoString wraps String (a TypeDecorator); Text has no length.
    if isinstance(c.type, String) or isinstance(getattr(c.type, "impl", None), String)
)
_INT_LIMITS: tuple[tuple[int, int], ...] = tuple(
    (i, 2**63 - 1 if isinstance(c.type, BigInteger) else 2**31 - 1)
    for i, c in enumerate(_COLUMNS.values())
    if isinstance(c.type, Integer)
)

_astuple = msgspec.structs.astuple

_SECONDS_PER_DAY = 86400  # Unix time has no leap seconds: every UTC day is this long
_last_day: tuple[float, float, str] = (0.0, 0.0, "")
"""The day last formatted: from, until (excluded), ``YYYY-MM-DD``; one object, so that
another thread sees the three together."""


def utc_day(ts: float) -> str:
    """``YYYY-MM-DD`` of ``ts`` in UTC (formatted once per day: this runs per request; the
    comparisons with the day's bounds cost half of finding its number, ``ts // 86400``)."""
    global _last_day
    start, end, day = _last_day
    if start <= ts < end:
        return day
    number = int(ts // _SECONDS_PER_DAY)  # NaN or infinite: raises, as it always did
    # Formatted from the day's start, not from ts: fromtimestamp rounds to microseconds,
    # which put a day's last half-microsecond (and, cached, the whole day) in the next.
    day = datetime.fromtimestamp(number * _SECONDS_PER_DAY, UTC).strftime("%Y-%m-%d")
    _last_day = (float(number * _SECONDS_PER_DAY), float((number + 1) * _SECONDS_PER_DAY), day)
    return day


def as_entry(row: LedgerEntry | Mapping[str, Any]) -> LedgerEntry:
    """``row`` as an entry: a mapping's unknown keys are dropped, missing ones defaulted."""
    if isinstance(row, LedgerEntry):
        return row
    return LedgerEntry(**{**_REQUIRED, **{k: v for k, v in row.items() if k in _COLUMNS}})


def storable_values(entries: Iterable[LedgerEntry]) -> list[tuple[Any, ...]]:
    """Each entry's values in :data:`FIELDS` order, every one storable."""
    values = []
    for entry in entries:
        row = _astuple(entry)
        values.append(row if _fits(row) else _astuple(_fit(entry)))
    return values


def storable(entries: Iterable[LedgerEntry]) -> list[LedgerEntry]:
    """The entries with every value storable; those that already are come back as they are."""
    return [entry if _fits(_astuple(entry)) else _fit(entry) for entry in entries]


_PER_ROW = ("entry_id", "request_id", "end_user")
"""The string columns whose values differ from row to row (an end user may too). The
others repeat (a model, a deployment, a status, the day): a combination of them once
found to fit is remembered."""
_ROW_STRINGS = tuple((i, n) for i, n in _STR_LIMITS if FIELDS[i] in _PER_ROW)
_REPEATED_STRINGS = tuple((i, n) for i, n in _STR_LIMITS if FIELDS[i] not in _PER_ROW)
_repeated = operator.itemgetter(*(i for i, _ in _REPEATED_STRINGS))
_FITTING_MEMORY = 1024
_fitting: set[tuple[Any, ...]] = set()


def _fits(values: tuple[Any, ...]) -> bool:
    """True when :func:`_fit` would change nothing: the common case (this runs for every
    row). Checking the eleven repeating strings of a row cost ~5k CPU instructions; a
    combination already seen is looked up instead, in one hash of the tuple of them."""
    repeated = _repeated(values)
    try:
        known = repeated in _fitting
    except TypeError:  # an unhashable value, so not a string: it does not fit
        return False
    if not known:
        if not _strings_fit(values, _REPEATED_STRINGS):
            return False
        if len(_fitting) >= _FITTING_MEMORY:
            _fitting.clear()
        _fitting.add(repeated)
    if not _strings_fit(values, _ROW_STRINGS):
        return False
    for index, most in _INT_LIMITS:
        value = values[index]
        if value.__class__ is not int or not 0 <= value <= most:
            return False
    return True


def _strings_fit(values: tuple[Any, ...], limits: tuple[tuple[int, int | None], ...]) -> bool:
    """Whether the strings at ``limits``' positions fit (None, or a str without NUL
    within its length). A value of another type than its column's is left to
    :func:`_fit`. A plain loop over the columns: C-level ``map(str, ...)`` and
    ``map(len, ...)`` over the values, or ``zip``, cost more."""
    for index, length in limits:
        value = values[index]
        if value is not None and (
            value.__class__ is not str or "\x00" in value or (length is not None and len(value) > length)
        ):
            return False
    return True


def _fit(entry: LedgerEntry) -> LedgerEntry:
    """A copy of ``entry`` with every value made storable: strings without NUL and cut to
    their column's length, integers within their column's range. Values of another type
    are left as they are (the database refuses them, and the row is set aside)."""
    values = _astuple(entry)
    changes: dict[str, Any] = {}
    for index, length in _STR_LIMITS:
        value = values[index]
        if isinstance(value, str) and ("\x00" in value or (length is not None and len(value) > length)):
            value = value.replace("\x00", "")
            changes[FIELDS[index]] = value[:length] if length else value
    for index, most in _INT_LIMITS:
        value = values[index]
        if isinstance(value, int) and not 0 <= value <= most:  # bools are 0 or 1: always fit
            changes[FIELDS[index]] = min(max(value, 0), most)
    return msgspec.structs.replace(entry, **changes)
