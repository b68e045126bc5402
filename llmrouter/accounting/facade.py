"""``Accounting``: keys, ledger, budgets and limits wired together from the config."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

import msgspec
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from llmrouter.accounting.budget_stores import DatabaseBudgetStore, RedisBudgetStore
from llmrouter.accounting.budgets import BudgetManager, BudgetStore, BudgetWindow, MemoryBudgetStore, to_units
from llmrouter.accounting.config import AccountingConfig
from llmrouter.accounting.db import create_engine
from llmrouter.accounting.hooks import AccountingHooks, unavailable
from llmrouter.accounting.key_events import KeyEvents, key_events_for
from llmrouter.accounting.keys import ApiKey, KeyStore
from llmrouter.accounting.ledger import LedgerWriter, Sink
from llmrouter.accounting.limits import Limiter, MemoryLimiter, RedisLimiter
from llmrouter.accounting.migrations import current_version, latest_version, upgrade
from llmrouter.accounting.models import LedgerRow
from llmrouter.accounting.reports import usage_report
from llmrouter.accounting.retries import Retries
from llmrouter.aio import within
from llmrouter.errors import ConfigError, LLMRouterError
from llmrouter.probes import SharedProbes
from llmrouter.redis_pool import connect

__all__ = ["Accounting"]

log = logging.getLogger("llmrouter.accounting")
_LEDGER: Any = LedgerRow.__table__  # type: ignore[attr-defined]


class Accounting:
    """Everything accounting, for the library and the service.

    Args:
        config: the ``accounting`` config section.
        engine: an engine to use instead of one built from ``config.database``.
        redis: a ``redis.asyncio.Redis`` to use instead of one built from ``config.redis.url``.
        ledger_sink: replaces the ledger's database insert (tests).

    Use as ``async with Accounting.from_config(cfg) as acct:`` and pass ``acct.hooks``
    to the router.
    """

    def __init__(
        self,
        config: AccountingConfig | None = None,
        *,
        engine: AsyncEngine | None = None,
        redis: Any = None,
        ledger_sink: Sink | None = None,
    ) -> None:
        self.config = config or AccountingConfig()
        self._own_engine = engine is None
        self.engine = engine or create_engine(self.config.database)
        self._own_redis = redis is None and self.config.redis.url is not None
        self.redis = redis
        self.keys = KeyStore(
            self.engine, cache_seconds=self.config.auth.cache_seconds, timeout=self.config.database.timeout
        )
        ledger = self.config.ledger
        self.ledger = LedgerWriter(
            self.engine,
            batch_size=ledger.batch_size,
            flush_interval=ledger.flush_interval,
            journal_dir=ledger.journal_dir,
            shutdown_timeout=ledger.shutdown_timeout,
            sink=ledger_sink,
        )
        self.limiter: Limiter | None = None
        self.budgets: BudgetManager | None = None
        self.retries = Retries()
        """Budget settlements and limit releases their store failed, tried again."""
        self.retries.on_drained = self.ledger.all_settled  # their journal lines may go
        self._hooks: AccountingHooks | None = None
        self._store_checks = SharedProbes()
        self._key_events: KeyEvents | None = None
        self._started = False

    @classmethod
    def from_config(cls, config: Any = None, **kwargs: Any) -> Accounting:
        """From a full :class:`~llmrouter.config.Config`, its ``accounting`` section, or a
        mapping of that section."""
        if config is None:
            section = AccountingConfig()
        elif isinstance(config, AccountingConfig):
            section = config
        elif hasattr(config, "accounting"):
            section = config.accounting
            workers = getattr(getattr(config, "server", None), "workers", 1)
            if workers > 1 and section.budget_backend == "auto" and section.redis.url is None:
                # Worker processes share nothing in memory: reserve in the database.
                section = msgspec.structs.replace(section, budget_backend="database")
        else:
            try:
                section = msgspec.convert(dict(config), AccountingConfig)
            except msgspec.ValidationError as exc:
                raise ConfigError(f"config: accounting: {exc}") from exc
        return cls(section, **kwargs)

    @property
    def hooks(self) -> AccountingHooks:
        """The router hooks (available after :meth:`start`)."""
        if self._hooks is None:
            raise RuntimeError("Accounting.start() has not been called")
        return self._hooks

    def _budget_store(self) -> BudgetStore:
        backend = self.config.budget_backend
        if backend == "auto":
            # PostgreSQL means replicas are likely: keep budgets exact across them.
            backend = (
                "redis"
                if self.redis is not None
                else "database"
                if self.engine.dialect.name == "postgresql"
                else "memory"
            )
        if backend == "redis":
            if self.redis is None:
                raise ConfigError(
                    "config: accounting.budget_backend is redis but accounting.redis.url is not set"
                )
            return RedisBudgetStore(
                self.redis,
                self.spent_in_ledger,
                prefix=self.config.redis.prefix,
                lease_seconds=self.config.limits.lease_seconds,
            )
        if backend == "database":
            return DatabaseBudgetStore(
                self.engine,
                self.spent_in_ledger,
                timeout=self.config.database.timeout,
                lease_seconds=self.config.limits.lease_seconds,
            )
        return MemoryBudgetStore(self.spent_in_ledger)

    async def start(self) -> None:
        """Migrate (when ``database.create``), replay the ledger journal, connect Redis."""
        if self._started:
            return
        if self.config.database.create:
            applied = await upgrade(self.engine)
            if applied:
                log.info("accounting: applied schema migrations %s", applied)
        elif await current_version(self.engine) < latest_version():
            raise ConfigError("accounting database schema is behind: run `llmrouter db upgrade`")
        settings = self.config.redis
        if self._own_redis and settings.url is not None:
            self.redis = connect(
                settings.url, timeout=settings.timeout, max_connections=settings.max_connections
            )
        await self.ledger.start()
        # Followed on connections of their own, which only an accounting that makes its
        # own connections (by URL) opens.
        self._key_events = key_events_for(
            self.engine,
            self.redis,
            config=self.config,
            forget=self.keys.forget,
            follow=self._own_redis if self.redis is not None else self._own_engine,
        )
        if self._key_events is not None:
            self.keys.on_change = self._key_events.publish
            self._key_events.start()
        self.limiter = (
            RedisLimiter(
                self.redis,
                prefix=self.config.redis.prefix,
                lease_seconds=self.config.limits.lease_seconds,
                retries=self.retries,
            )
            if self.redis is not None
            else MemoryLimiter()
        )
        self.budgets = BudgetManager(self.config.budgets, self._budget_store(), self.retries)
        self._hooks = AccountingHooks(
            keys=self.keys,
            ledger=self.ledger,
            budgets=self.budgets,
            limiter=self.limiter,
            limits=self.config.limits,
            retries=self.retries,
        )
        await self._release_interrupted()
        self._started = True

    async def aclose(self) -> None:
        """Flush the ledger and close connections.

        Bounded: the ledger's flush by ``ledger.shutdown_timeout``; what comes before it,
        and all that comes after it, by :data:`CLOSE_SECONDS` each (a database or Redis
        that stopped answering holds the shutdown no longer; what was not written or
        settled stays in the journal, for the next start)."""
        if not self._started:
            await _bounded("closing the database's connections", self.engine.dispose(), _close_by())
            return
        self._started = False
        key_events, self._key_events = self._key_events, None
        closing_key_events = None
        if key_events is not None:
            self.keys.on_change = None
            # Beside the ledger's flush, not before it: each may wait on a database that
            # stopped answering, and the shutdown is bounded by the longer of the two.
            closing_key_events = asyncio.get_running_loop().create_task(
                _bounded("closing the key-change listener", key_events.aclose(), _close_by())
            )
        try:
            await self.ledger.stop()
        finally:
            if closing_key_events is not None:
                await closing_key_events
        by = _close_by()  # one bound for all that follows
        try:
            await _bounded(
                "settling the requests interrupted by the shutdown", self._release_interrupted(), by
            )
            # Budget settlements and limit releases, while their stores are open.
            await _bounded("retrying the settlements that waited", self.retries.aclose(), by)
        finally:
            self.ledger.close()  # its journal kept if rows or settlements still wait
        if self.budgets is not None:
            await _bounded("closing the budget store", self.budgets.aclose(), by)
        if self.limiter is not None:
            await _bounded("closing the limiter", self.limiter.aclose(), by)
        if self._own_redis and self.redis is not None:
            await _bounded("closing Redis", self.redis.aclose(), by)
        await _bounded("closing the database's connections", self.engine.dispose(), by)

    async def _release_interrupted(self) -> None:
        """Give back what the requests a process did not finish held (replayed from a dead
        one's journal, or still running at shutdown): see
        :meth:`~llmrouter.accounting.hooks.AccountingHooks.release_interrupted`."""
        interrupted, self.ledger.interrupted = self.ledger.interrupted, []
        unsettled, self.ledger.unsettled = self.ledger.unsettled, []
        if self._hooks is not None:
            if interrupted:
                await self._hooks.release_interrupted(interrupted)
            if unsettled:
                await self._hooks.settle_unsettled(unsettled)
        if not self.retries:
            self.ledger.all_settled()  # none waits: the journal need not keep their lines

    async def __aenter__(self) -> Accounting:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def auth_required(self) -> bool:
        """``auth.enabled``, or with ``auto``: whether any key exists."""
        enabled = self.config.auth.enabled
        if enabled == "auto":
            # Known once a key is (for good): the count's coroutine only until then.
            return self.keys.any_known or await self.keys.any_exist()
        return bool(enabled)

    async def authenticate(self, secret: str) -> ApiKey:
        """The active key for a secret (raises ``AuthenticationError``)."""
        return await self.keys.verify(secret)

    async def spent_in_ledger(self, window: BudgetWindow) -> int:
        """What the ledger says a budget window has spent, in nano-dollars."""
        try:
            return await within(self.config.database.timeout, self._spent_in_ledger(window))
        except TimeoutError as exc:
            raise unavailable(exc, "reading a budget's spend from the ledger") from exc

    async def _spent_in_ledger(self, window: BudgetWindow) -> int:
        await self._flush_before_reading("spend")
        query = select(func.coalesce(func.sum(_LEDGER.c.cost), 0.0)).where(
            _LEDGER.c.created_at >= window.start
        )
        if window.key_id is None:
            query = query.where(_LEDGER.c.api_key_id.is_(None))
        else:
            query = query.where(_LEDGER.c.api_key_id == window.key_id)
        if window.model is not None:
            query = query.where(_LEDGER.c.model_group == window.model)
        if window.end_user is not None:
            query = query.where(_LEDGER.c.end_user == window.end_user)
        try:
            async with self.engine.connect() as conn:
                total = (await conn.execute(query)).scalar_one()
        except Exception as exc:
            raise unavailable(exc, "reading a budget's spend from the ledger") from exc
        return to_units(float(total or 0.0))

    async def _flush_before_reading(self, what: str) -> None:
        """Write this process's queued rows first, so that what is read is current; should
        the database refuse them, they stay queued and what it has is read all the same."""
        try:
            await self.ledger.flush()
        except RuntimeError:
            log.warning("accounting: ledger not flushed before reading %s: %s", what, self.ledger.last_error)

    async def usage(self, **kwargs: Any) -> list[dict[str, Any]]:
        """:func:`~llmrouter.accounting.reports.usage_report` over this ledger (flushed first).

        Reaching the database, and the flush, are bounded by ``database.timeout``; the
        report's query is not (all time over a large ledger may take minutes: only the
        URL's ``command_timeout`` bounds it on PostgreSQL).

        Raises:
            AccountingUnavailableError: the database cannot be reached now (503, with
                ``Retry-After``), or not within ``database.timeout``.
        """
        try:
            await within(self.config.database.timeout, self._reach_for_reading())
            return await usage_report(self.engine, **kwargs)
        except LLMRouterError:
            raise  # the request's own mistake (a bad dimension)
        except Exception as exc:
            raise unavailable(exc, "reading usage from the ledger") from exc

    async def _reach_for_reading(self) -> None:
        """The flush before a report, and a connection to the database (on PostgreSQL,
        checked before use), which a database down or not answering fails."""
        await self._flush_before_reading("usage")
        async with self.engine.connect():
            pass

    async def check_stores(self) -> dict[str, Any]:
        """Whether the database and Redis answer now (:data:`STORE_CHECK_SECONDS` each),
        for ``GET /ready``: ``{"database": "ok" | the error, "redis": ..., "ready": ...}``.
        One check at a time, reused for a second (:mod:`llmrouter.probes`)."""
        return await self._store_checks.result("stores", self._check_stores)

    async def _check_stores(self) -> dict[str, Any]:
        report = {"database": await _answer_of(self._ping_database())}
        if self.redis is not None:
            report["redis"] = await _answer_of(self.redis.ping())
        return {**report, "ready": all(answer == "ok" for answer in report.values())}

    async def _ping_database(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    def readiness(self) -> dict[str, Any]:
        return {
            "ledger_pending": self.ledger.pending,
            "ledger_written": self.ledger.written,
            "ledger_failures": self.ledger.failures,
            "ledger_rejected": self.ledger.rejected,
            "ledger_unjournaled": self.ledger.unjournaled,
            "ledger_last_error": self.ledger.last_error,
            "in_flight": self._hooks.in_flight if self._hooks else 0,
            "settlements_waiting": len(self.retries),
        }


CLOSE_SECONDS = 5.0
"""At shutdown, the longest wait for the stores to let go (settlements, connections
closed) before the ledger's flush, and again after it (on top of ``shutdown_timeout``)."""


def _close_by() -> float:
    return time.monotonic() + CLOSE_SECONDS


async def _bounded(what: str, work: Coroutine[Any, Any, Any], by: float) -> None:
    """``await work`` until ``by`` (``time.monotonic()``); past that it is given up, and
    logged."""
    try:
        await within(max(0.05, by - time.monotonic()), work)
    except TimeoutError:
        log.warning("accounting: %s did not finish in time at shutdown; going on without it", what)


STORE_CHECK_SECONDS = 1.0
"""How long ``GET /ready`` waits for the database, and for Redis, to answer."""


async def _answer_of(check: Coroutine[Any, Any, Any]) -> str:
    """``ok``, or why not (a store that does not answer within the bound included)."""
    try:
        await within(STORE_CHECK_SECONDS, check)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return "ok"
