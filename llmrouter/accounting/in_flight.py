"""Requests in flight, as the ledger's journal keeps them until they finish.

An admitted request is journaled before its upstream call (see
:meth:`~llmrouter.accounting.ledger.LedgerWriter.open`) with what its ledger row needs
should its process end first: a replica killed mid-request (``kill -9``, the OOM
killer), or a shutdown that closes the ledger under it. That row's status is
``interrupted``: its prompt as estimated for pricing, at the highest input price it may
be sent at, no output (what the upstream made of it is unknown), ``usage_estimated``.
The request's finished row has the same ``entry_id`` and takes its place.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from llmrouter.accounting.entry import LedgerEntry, as_entry, utc_day

if TYPE_CHECKING:
    from llmrouter.context import RequestContext

__all__ = [
    "INTERRUPTED",
    "PROCESS_EXITED",
    "SHUTDOWN",
    "InFlight",
    "Interrupted",
    "in_flight",
    "rows_to_replay",
]

log = logging.getLogger("llmrouter.accounting.ledger")

INTERRUPTED = "interrupted"
"""The status of a request its process did not finish."""
PROCESS_EXITED = "process_exited"
"""The error code of an interrupted request whose process died (replayed at a start)."""
SHUTDOWN = "shutdown"
"""The error code of one still running when the ledger closed."""


class InFlight(msgspec.Struct, array_like=True, gc=False):
    """An admitted request as its journal line keeps it until it finishes (a JSON array,
    where rows are objects): what its row needs should its process end first. A third
    of a row's line, and a third of its cost to encode."""

    entry_id: str
    """Its finished row's too, which takes its place."""
    request_id: str
    created_at: float
    api_key_id: str | None
    operation: str
    stream: bool
    model_group: str | None
    prompt_tokens: int
    """As estimated for pricing or for a TPM limit (0 when neither needed it)."""
    cost: float
    """The prompt at the highest input price it may be sent at."""
    priced: bool
    end_user: str | None
    hold: Any = None
    """What it holds (accounting: its budget reservation and rate-limit slots), given
    back with its row."""
    unsettled_cost: float | None = None
    """Set on the line kept for a finished request whose settlement waits for its store
    (:meth:`~llmrouter.accounting.ledger.LedgerWriter.keep_unsettled`): its row's cost, to
    settle its hold to should the process end first. Such a line makes no row."""

    def row(self, error_code: str) -> LedgerEntry:
        """Its row, interrupted: the estimated prompt at its estimated cost, no output
        (what the upstream made of it is unknown)."""
        return LedgerEntry(
            self.entry_id,
            self.request_id,
            self.created_at,
            utc_day(self.created_at),
            self.api_key_id,
            self.operation,
            self.stream,
            self.model_group,
            None,  # deployment: perhaps not chosen yet
            None,  # provider
            None,  # upstream_model
            self.prompt_tokens,
            0,  # completion_tokens
            0,  # cached_tokens
            self.cost,
            "price_table" if self.priced else "unpriced",
            True,  # usage_estimated
            None,  # cache_status
            None,  # latency_ms
            None,  # ttft_ms
            INTERRUPTED,
            error_code,
            0,  # attempts
            self.end_user,
        )


def in_flight(ctx: RequestContext, entry_id: str, hold: Any = None) -> InFlight:
    """An admitted request, for :meth:`LedgerWriter.open`."""
    return InFlight(
        entry_id,
        ctx.request_id,
        ctx.created,
        ctx.api_key_id,
        ctx.operation,
        ctx.stream,
        ctx.model_group,
        ctx.prompt_tokens_estimate,
        ctx.prompt_cost_estimate,
        bool(ctx.max_cost),
        ctx.request.end_user if ctx.request is not None else None,
        hold,
    )


class Interrupted(NamedTuple):
    """A request recorded as interrupted, with its journal line (whose ``hold`` is what it
    held)."""

    row: LedgerEntry
    line: InFlight


def rows_to_replay(lines: list[Any]) -> tuple[list[LedgerEntry], list[Interrupted], list[InFlight]]:
    """A dead process's journal lines as the rows to insert: its rows (objects), and the
    rows of the requests it had in flight (arrays) that have none (a request's line may
    be there twice: copied forward); and the lines of the settlements that waited for
    their store (``unsettled_cost`` set).

    A request with such a line finished, and its row went into the journal before the
    line; when that row is not here (inserted, and its segment dropped, or the process
    died between the two), its interrupted row is replayed too, and inserts nothing over
    a row the database has. Its hold is settled once, to the line's cost: it is not among
    the interrupted ones returned."""
    rows = [as_entry(line) for line in lines if not isinstance(line, list)]
    finished = {row.entry_id for row in rows}
    interrupted: dict[str, Interrupted] = {}
    unsettled: dict[str, InFlight] = {}
    for line in lines:
        if isinstance(line, list):
            try:
                request = msgspec.convert(line, InFlight)
            except msgspec.ValidationError:
                log.error("ledger: an unreadable journal line of a request in flight: %.200s", line)
                continue
            if request.unsettled_cost is not None:
                unsettled[request.entry_id] = request
            elif request.entry_id not in finished:
                interrupted[request.entry_id] = Interrupted(request.row(PROCESS_EXITED), request)
    rows += [item.row for item in interrupted.values()]
    holds = [item for entry_id, item in interrupted.items() if entry_id not in unsettled]
    return rows, holds, list(unsettled.values())
