"""API keys: created with a random secret shown once, stored as a hash.

A secret looks like ``sk-llmr-<prefix>-<43 random chars>``. The 8-character prefix is
public: it is stored in clear, indexed, shown in listings and used to find the row;
the whole secret is stored only as its SHA-256.

Why SHA-256 and not scrypt/argon2: those slow hashes protect *low-entropy* passwords
against offline guessing. Our secrets carry 256 random bits, so guessing is hopeless
whatever the hash, and a slow hash would only add tens of milliseconds of CPU to every
request. Comparison uses :func:`hmac.compare_digest` (constant time), and no secret is
ever logged or put in an error message.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import hmac
import math
import re
import secrets
import string
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from functools import partial
from typing import Any, Literal, NamedTuple, TypeVar

import msgspec
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from llmrouter.accounting.models import ApiKeyRow
from llmrouter.errors import AuthenticationError, InvalidRequestError, NotFoundError

__all__ = [
    "MAX_EXPIRES_AT",
    "SECRET_PREFIX",
    "UPDATABLE",
    "ApiKey",
    "KeyStore",
    "Principal",
    "hash_secret",
    "parse_secret",
    "shown_reference",
]

T = TypeVar("T")

SECRET_PREFIX = "sk-llmr-"
_PREFIX_LEN = 8
_PREFIX_AT = len(SECRET_PREFIX)
_PREFIX_END = _PREFIX_AT + _PREFIX_LEN
"""Where a secret's public prefix is."""
_ALPHABET = string.ascii_lowercase + string.digits
_PUBLIC_PART = rf"{re.escape(SECRET_PREFIX)}([a-z0-9]{{{_PREFIX_LEN}}})"
_SECRET = re.compile(_PUBLIC_PART + "-.", re.DOTALL)
"""A secret: the prefix, a public part of 8 characters, a dash, then the rest."""
_REFERENCE = re.compile(_PUBLIC_PART + r"(?:-|\Z)")
"""A key named by its public part, as listings and 401s show it (or a whole secret)."""
Scope = Literal["admin", "user"]
SCOPES: frozenset[str] = frozenset({"admin", "user"})
_TABLE = ApiKeyRow.__table__  # type: ignore[attr-defined]


class ApiKey(msgspec.Struct, kw_only=True, frozen=True):
    """A key as the rest of llmrouter sees it (never the secret or its hash)."""

    id: str
    name: str
    prefix: str
    scopes: tuple[str, ...] = ("user",)
    allowed_models: tuple[str, ...] | None = None
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None
    budget: float | None = None
    budget_period: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    note: str | None = None
    budget_version: int = 0
    """Raised when the budget is set again after none, or its period changes (see
    :meth:`KeyStore.update`): the budget's windows are then counted afresh."""

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def allows_model(self, *names: str | None) -> bool:
        """True if any of ``names`` (requested name, resolved group) matches the allow-list."""
        if self.allowed_models is None:
            return True
        return any(
            name is not None and fnmatch.fnmatchcase(name, pattern)
            for name in names
            for pattern in self.allowed_models
        )

    def state(self, now: float | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (time.time() if now is None else now):
            return "expired"
        return "active"


Principal = ApiKey
"""The authenticated caller (``RequestContext.principal``)."""


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_secret(secret: str) -> str | None:
    """The public prefix of a well-formed secret, else None (one match: this runs for
    every request that carries a key)."""
    found = _SECRET.match(secret)
    return found.group(1) if found is not None else None


def _prefix_of_reference(reference: str) -> str | None:
    """The prefix a key reference gives in its public form: ``sk-llmr-<prefix>-`` as
    ``keys list`` shows it, ``sk-llmr-<prefix>-...`` as a 401 message does, or
    ``sk-llmr-<prefix>``; also a whole secret, whose key is then found by its prefix.
    None for anything else (a bare prefix is matched as it is)."""
    found = _REFERENCE.match(reference)
    return found.group(1) if found is not None else None


def shown_reference(reference: str) -> str:
    """``reference`` as an error message may show it: a whole secret given as a key's
    reference (pasted to revoke a leaked key, say, or mistyped) is cut to
    ``sk-llmr-<prefix>-...``, since no secret is put in an error message."""
    public = len(SECRET_PREFIX) + _PREFIX_LEN + 1  # sk-llmr-<prefix>-
    if not reference.startswith(SECRET_PREFIX) or len(reference) <= public:
        return reference
    return f"{reference[:public]}..."


def _to_key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        scopes=tuple(s for s in row.scopes.split(",") if s),
        allowed_models=tuple(m for m in row.allowed_models.split(",") if m)
        if row.allowed_models is not None
        else None,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        budget=row.budget,
        budget_period=row.budget_period,
        rpm=row.rpm,
        tpm=row.tpm,
        concurrency=row.concurrency,
        note=row.note,
        budget_version=row.budget_version or 0,
    )


_MAX_NAME = 200  # the column's length
_MAX_LIMIT = 2**31 - 1  # INTEGER columns
_MAX_PATTERNS = 1000
_MAX_PATTERN = 200  # a model name's longest
_MAX_NOTE = 10_000
MAX_BUDGET_USD = 1e9  # in nano-dollars still far inside 64 bits (see budgets.MAX_UNITS)
MAX_EXPIRES_AT = 253_402_300_799.0
"""9999-12-31T23:59:59Z, the last second a date can show (``keys list`` crashed on later)."""


UPDATABLE: frozenset[str] = frozenset(
    {
        "name",
        "scopes",
        "allowed_models",
        "expires_at",
        "budget",
        "budget_period",
        "rpm",
        "tpm",
        "concurrency",
        "note",
    }
)
"""The fields :meth:`KeyStore.update` changes."""


def _check_new_fields(fields: Mapping[str, Any], names: Collection[str]) -> None:
    """Rules on the fields ``names`` being set, that keys stored before the rules may
    break: such a key's other fields can still be changed (by its id or prefix).

    A name with ``/`` cannot be given in the admin API's ``/v1/admin/keys/{key}`` paths, and
    one spelled as a secret (``sk-llmr-…``) would be taken for one there (found by its
    prefix, not its name) and look like a leaked secret in listings; an expiry after
    9999-12-31 cannot be shown as a date (``keys list`` crashed on one)."""
    if "name" in names and ("/" in fields["name"] or fields["name"].startswith(SECRET_PREFIX)):
        raise InvalidRequestError(
            f"name must be 1 to {_MAX_NAME} printable characters, without '/' and not beginning "
            f"with {SECRET_PREFIX!r} (a name stands for its key in /v1/admin/keys/{{key}})",
            param="name",
        )
    expires_at = fields["expires_at"]
    if "expires_at" in names and expires_at is not None and expires_at > MAX_EXPIRES_AT:
        raise InvalidRequestError("expires_at must be no later than 9999-12-31T23:59:59Z", param="expires_at")


def _check_fields(fields: Mapping[str, Any]) -> None:
    """Refuse what the database or the budget arithmetic cannot hold (``fields``: every
    name in :data:`UPDATABLE`)."""
    name, allowed_models, note = fields["name"], fields["allowed_models"], fields["note"]
    expires_at, budget = fields["expires_at"], fields["budget"]
    if not fields["scopes"] or not set(fields["scopes"]) <= SCOPES:
        raise InvalidRequestError(f"scopes must be a non-empty subset of {sorted(SCOPES)}", param="scopes")
    if fields["budget_period"] not in (None, "day", "month", "total"):
        raise InvalidRequestError("budget_period must be day, month or total", param="budget_period")
    if fields["budget_period"] is not None and budget is None:
        raise InvalidRequestError("budget_period needs a budget", param="budget_period")
    if not name or len(name) > _MAX_NAME or not name.isprintable():
        raise InvalidRequestError(
            f"name must be 1 to {_MAX_NAME} printable characters, without '/'", param="name"
        )
    if allowed_models is not None and (
        len(allowed_models) > _MAX_PATTERNS
        # Stored comma-separated: a comma would silently split one pattern into two.
        or any(not 0 < len(m) <= _MAX_PATTERN or "," in m or not m.isprintable() for m in allowed_models)
    ):
        raise InvalidRequestError(
            f"allowed_models: at most {_MAX_PATTERNS} patterns of 1 to {_MAX_PATTERN} printable "
            "characters, without commas",
            param="allowed_models",
        )
    if note is not None and (len(note) > _MAX_NOTE or "\x00" in note):  # PostgreSQL text has no NUL
        raise InvalidRequestError(f"note must be at most {_MAX_NOTE} characters, without NUL", param="note")
    if expires_at is not None and not math.isfinite(expires_at):
        raise InvalidRequestError("expires_at must be a finite time", param="expires_at")
    if budget is not None and not 0 <= budget <= MAX_BUDGET_USD:  # NaN fails too
        raise InvalidRequestError(f"budget must be between 0 and {MAX_BUDGET_USD:.0f}", param="budget")
    for field in ("rpm", "tpm", "concurrency"):
        value = fields[field]
        if value is not None and not 1 <= value <= _MAX_LIMIT:
            raise InvalidRequestError(f"{field} must be between 1 and {_MAX_LIMIT}", param=field)


class _Cached(NamedTuple):
    """A key read by its prefix, as :meth:`KeyStore.verify` caches it."""

    read_at: float
    """``time.monotonic()`` when it was read: trusted for ``cache_seconds`` from then."""
    key: ApiKey
    secret_hash: str
    verified: str | None
    """The secret that last matched ``secret_hash``, compared with the next request's in
    constant time instead of hashing that one again (None until one matches).

    Keeping it means the plaintext secret of each key in use stays in this process's
    memory as long as its cache entry does: until the entry is read again (stale after
    ``cache_seconds``, at its key's next request), dropped by :meth:`KeyStore.forget`
    (the key revoked, changed or rotated, here or, with key events, on another replica),
    or the process ends. Every request carries the same secret in clear through this
    process's memory (its headers) anyway, and a caller able to read that memory can
    read requests as they come; the difference is that a core dump or a swapped-out page
    may now hold the secret of a key used once, long after its request. Secrets are 256
    random bits, never logged nor put in an error message, and still stored (on disk)
    only as their SHA-256."""

    def __repr__(self) -> str:  # not the secret, nor its hash
        verified = "yes" if self.verified is not None else "no"
        return f"_Cached(read_at={self.read_at!r}, key={self.key!r}, verified={verified})"


class KeyStore:
    """Create, list, revoke and verify keys.

    Args:
        engine: the accounting database.
        cache_seconds: how long a verified key is trusted without a database read.
        timeout: seconds a caller of :meth:`verify`, :meth:`any_exist` or :meth:`load`
            waits on the database before ``TimeoutError`` (None: no bound).
    """

    def __init__(
        self, engine: AsyncEngine, *, cache_seconds: float = 5.0, timeout: float | None = None
    ) -> None:
        self._engine = engine
        self._cache_seconds = cache_seconds
        self._timeout = timeout  # for the reads requests wait on: verify, any_exist, load_cached
        self._by_prefix: dict[str, _Cached] = {}
        self._by_id: dict[str, tuple[float, ApiKey | None]] = {}  # load_cached's; None: no such key
        self._id_of_prefix: dict[str, str] = {}  # which _by_id entry forget(prefix) drops
        self._queries: dict[str, asyncio.Future[Any]] = {}  # in flight, shared (see _shared)
        self.any_known = False
        """True once a key is known to exist (created here, or counted), for good: what
        :meth:`any_exist` then answers, which a caller may read without awaiting it."""
        self._counts_begun = 0  # how many key counts have started (see any_exist)
        self._forgotten = 0  # how many times forget() ran (see _query_prefix)
        self.on_change: Callable[[str], Awaitable[None]] | None = None
        """Called with a key's prefix after this store revoked, changed or rotated it
        (:class:`~llmrouter.accounting.key_events.KeyEvents` tells the other replicas)."""

    def forget(self, prefix: str | None = None) -> None:
        """Drop the cached key of ``prefix`` (every cached key for None): it changed, here
        or on another replica. A read of it in flight now is not cached either: it may
        have read the row as it was."""
        if prefix is None:
            self._by_prefix.clear()
            self._by_id.clear()
            self._id_of_prefix.clear()
        else:
            self._by_prefix.pop(prefix, None)
            key_id = self._id_of_prefix.pop(prefix, None)
            if key_id is not None:
                self._by_id.pop(key_id, None)
        self._forgotten += 1

    async def create(
        self,
        name: str,
        *,
        scopes: Sequence[str] = ("user",),
        allowed_models: Sequence[str] | None = None,
        expires_at: float | None = None,
        budget: float | None = None,
        budget_period: str | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        concurrency: int | None = None,
        note: str | None = None,
    ) -> tuple[ApiKey, str]:
        """Create a key; returns it and its secret (the only time the secret is seen).

        Raises:
            InvalidRequestError: a field the database or the budget arithmetic cannot
                hold (``param`` names it).
        """
        fields = {
            "name": name,
            "scopes": scopes,
            "allowed_models": allowed_models,
            "expires_at": expires_at,
            "budget": budget,
            "budget_period": budget_period,
            "rpm": rpm,
            "tpm": tpm,
            "concurrency": concurrency,
            "note": note,
        }
        _check_fields(fields)
        _check_new_fields(fields, fields)
        prefix, secret = _new_secret()
        row = ApiKeyRow(
            id=f"key_{uuid.uuid4().hex[:16]}",
            prefix=prefix,
            secret_hash=hash_secret(secret),
            created_at=time.time(),
            **_stored_fields(fields),
        )
        async with self._engine.begin() as conn:
            await conn.execute(_TABLE.insert().values(**row.model_dump()))
        self.any_known = True
        return _to_key(row), secret

    async def list(
        self, *, include_revoked: bool = True, limit: int | None = None, after: str | None = None
    ) -> list[ApiKey]:
        """Keys in the order they were made; at most ``limit``, those after the key with
        id ``after`` (a page: pass the last id of the one before).

        Raises:
            InvalidRequestError: ``after`` is not a key's id.
        """
        query = select(_TABLE).order_by(_TABLE.c.created_at, _TABLE.c.id)
        if not include_revoked:
            query = query.where(_TABLE.c.revoked_at.is_(None))
        if limit is not None:
            query = query.limit(limit)
        async with self._engine.connect() as conn:
            if after is not None:
                start = (
                    None
                    if "\x00" in after
                    else await conn.scalar(select(_TABLE.c.created_at).where(_TABLE.c.id == after))
                )
                if start is None:
                    raise InvalidRequestError(f"no API key with id {after!r}", param="after")
                query = query.where(
                    or_(_TABLE.c.created_at > start, and_(_TABLE.c.created_at == start, _TABLE.c.id > after))
                )
            rows = (await conn.execute(query)).mappings().all()
        return [_to_key(ApiKeyRow(**row)) for row in rows]

    async def get(self, id_or_name: str) -> ApiKey | None:
        """A key by id, else by prefix, else by name.

        The prefix may be given bare or as listings and 401 messages show it
        (``sk-llmr-<prefix>-``, ``sk-llmr-<prefix>-...``): what an operator copies.

        Names may repeat (a rotated key keeps its name while clients move to the new
        one): a name stands for its one key not revoked, or, when all are revoked, the
        newest.

        Raises:
            InvalidRequestError: (409 ``ambiguous_key``) more than one key of that name is
                not revoked; revoking or reporting on "the" key would pick one of them.
        """
        if "\x00" in id_or_name:  # no key has one (names are printable); PostgreSQL refuses it
            return None
        public = _prefix_of_reference(id_or_name)
        if public is not None and shown_reference(id_or_name) != id_or_name:
            # A whole secret: found by its prefix alone, so that the secret is no query
            # parameter (which the database driver's debug log writes out).
            prefixes = [public]
            found = _TABLE.c.prefix == public
        else:
            prefixes = [id_or_name, *filter(None, [public])]
            found = or_(_TABLE.c.id == id_or_name, _TABLE.c.prefix.in_(prefixes), _TABLE.c.name == id_or_name)
        query = select(_TABLE).where(found).order_by(_TABLE.c.created_at.desc())
        async with self._engine.connect() as conn:
            rows = [ApiKeyRow(**row) for row in (await conn.execute(query)).mappings().all()]
        for field, wanted in (("id", id_or_name), *(("prefix", prefix) for prefix in prefixes)):
            for row in rows:
                if getattr(row, field) == wanted:
                    return _to_key(row)
        if not rows:
            return None
        unrevoked = [row for row in rows if row.revoked_at is None]
        if len(unrevoked) > 1:
            raise InvalidRequestError(
                f"{len(unrevoked)} keys named {shown_reference(id_or_name)!r} are not revoked: "
                f"use an id ({', '.join(row.id for row in unrevoked)}) or a prefix",
                status=409,
                code="ambiguous_key",
            )
        return _to_key(unrevoked[0] if unrevoked else rows[0])

    async def revoke(self, id_or_name: str) -> ApiKey:
        key = await self.get(id_or_name)
        if key is None:
            raise NotFoundError(f"no API key {shown_reference(id_or_name)!r}", code="key_not_found")
        if key.revoked_at is None:
            async with self._engine.begin() as conn:
                await conn.execute(update(_TABLE).where(_TABLE.c.id == key.id).values(revoked_at=time.time()))
            await self._changed(key.prefix)
        return await self.get(key.id) or key

    async def update(self, id_or_name: str, changes: Mapping[str, Any]) -> ApiKey:
        """Change fields of a key that is not revoked; returns it as it now is.

        ``changes`` maps names in :data:`UPDATABLE` to new values; a field it leaves out
        stays, and None clears one that may be empty (``allowed_models``: every model;
        ``expires_at``: never; ``budget``, ``rpm``, ``tpm``, ``concurrency``: none of its
        own, the configured defaults apply; ``note``). The key keeps its id, secret and
        usage. A budget keeps counting what its window has spent when only its amount
        changes; set again after none, or given another period, it is counted afresh
        from the ledger (its ``budget_version`` is raised), so that spend in between is
        not missed. This replica uses the new fields at once; others within
        ``auth.cache_seconds``, as for revocation.

        Raises:
            NotFoundError: no such key.
            InvalidRequestError: a field that cannot be changed or stored (``param`` names
                it); 409 ``key_revoked`` for a revoked key.
        """
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise InvalidRequestError(
                f"these fields cannot be changed: {sorted(unknown)}", param=min(unknown)
            )
        key = await self._unrevoked(id_or_name)
        fields = {name: changes.get(name, getattr(key, name)) for name in UPDATABLE}
        if fields["budget"] is None and "budget_period" not in changes:
            fields["budget_period"] = None  # the period goes with the budget it was for
        _check_fields(fields)
        _check_new_fields(fields, changes)
        stored = _stored_fields(fields)
        # Only what changes is written: two updates of other fields at once both land.
        written: dict[str, Any] = {name: stored[name] for name in changes}
        if "budget" in changes or "budget_period" in changes:
            written["budget"], written["budget_period"] = stored["budget"], stored["budget_period"]
            if stored["budget"] is not None and (
                key.budget is None or stored["budget_period"] != key.budget_period
            ):
                written["budget_version"] = func.coalesce(_TABLE.c.budget_version, 0) + 1
        if not written:
            return key
        await self._write_unrevoked(key, written)
        return await self.get(key.id) or key

    async def rotate(self, id_or_name: str) -> tuple[ApiKey, str]:
        """Give a key that is not revoked a new secret; returns it and the secret (shown
        this once). The old secret stops working at once on this replica, on others
        within ``auth.cache_seconds``; the key keeps its id, name, limits, budget and
        usage.

        Raises:
            NotFoundError: no such key.
            InvalidRequestError: 409 ``key_revoked`` for a revoked key.
        """
        key = await self._unrevoked(id_or_name)
        prefix, secret = _new_secret()
        await self._write_unrevoked(key, {"prefix": prefix, "secret_hash": hash_secret(secret)})
        return await self.get(key.id) or key, secret

    async def _unrevoked(self, id_or_name: str) -> ApiKey:
        key = await self.get(id_or_name)
        if key is None:
            raise NotFoundError(f"no API key {shown_reference(id_or_name)!r}", code="key_not_found")
        if key.revoked_at is not None:
            raise _revoked(key)
        return key

    async def _write_unrevoked(self, key: ApiKey, values: dict[str, Any]) -> None:
        """Write ``values`` into ``key``'s row unless it was revoked meanwhile."""
        query = update(_TABLE).where(_TABLE.c.id == key.id, _TABLE.c.revoked_at.is_(None)).values(**values)
        async with self._engine.begin() as conn:
            changed = (await conn.execute(query)).rowcount
        if not changed:
            self.forget(key.prefix)
            raise _revoked(key)
        await self._changed(key.prefix)

    async def _changed(self, prefix: str) -> None:
        self.forget(prefix)
        if self.on_change is not None:
            await self.on_change(prefix)

    async def any_exist(self) -> bool:
        """Whether any key was ever created (revoked keys count: revoking the last key
        must not open the service).

        A yes is kept for good, and costs nothing from then on. A no is never kept: with
        auth ``auto`` it leaves the service open, and a key created by another worker or
        replica must close it from that worker's next request, not ``cache_seconds``
        later (an anonymous caller could create an admin key meanwhile). So while no key
        exists (a fresh install), each request counts the keys, concurrent ones sharing
        one count; a count that began before this call arrived may predate a key created
        since, so its no is not taken, and the next count, begun after, answers.
        """
        if self.any_known:
            return True
        arrived = self._counts_begun
        while True:
            begun, exists = await self._shared("*", self._count_keys)
            if exists or begun > arrived:
                return exists

    async def _count_keys(self) -> tuple[int, bool]:
        """Which count this is (see :meth:`any_exist`), and whether any key exists."""
        self._counts_begun += 1
        begun = self._counts_begun
        async with self._engine.connect() as conn:
            count = (await conn.execute(select(func.count()).select_from(_TABLE))).scalar_one()
        self.any_known = self.any_known or count > 0
        return begun, self.any_known

    async def verify(self, secret: str) -> ApiKey:
        """The active key for ``secret``.

        Raises:
            AuthenticationError: malformed, unknown, revoked or expired.
        """
        # The secret that last matched a cached key is kept beside it (see _Cached), and a
        # request's is compared with it, in constant time, instead of parsed and hashed
        # again: SHA-256 and the regular expression were ~13k of the ~25k CPU instructions
        # authenticating took. It is found by its public prefix; one equal to it is well
        # formed. compare_digest takes ASCII strings only (a secret is; a header may not be).
        cached = self._by_prefix.get(secret[_PREFIX_AT:_PREFIX_END])
        if (
            cached is None
            or cached.verified is None
            or not secret.isascii()
            or not hmac.compare_digest(secret, cached.verified)
            or time.monotonic() - cached.read_at > self._cache_seconds
        ):
            cached = await self._verify_hash(secret)
        key = cached.key
        state = key.state()
        if state != "active":
            raise AuthenticationError(f"API key sk-llmr-{key.prefix}-... is {state}", code=f"key_{state}")
        return key

    async def _verify_hash(self, secret: str) -> _Cached:
        """The cached key whose stored hash ``secret`` matches, read again when it is older
        than ``cache_seconds``; the secret is then kept beside it, for :meth:`verify`."""
        prefix = parse_secret(secret)
        if prefix is None:
            raise AuthenticationError("invalid API key format (expected sk-llmr-...)")
        cached = self._by_prefix.get(prefix)
        if cached is None or time.monotonic() - cached.read_at > self._cache_seconds:
            cached = await self._shared(prefix, lambda: self._query_prefix(prefix))
        if cached is None:
            raise AuthenticationError(f"unknown API key sk-llmr-{prefix}-...")
        if not hmac.compare_digest(hash_secret(secret), cached.secret_hash):
            raise AuthenticationError(f"unknown API key sk-llmr-{prefix}-...")
        if secret.isascii() and self._by_prefix.get(prefix) is cached:  # not forgotten meanwhile
            cached = cached._replace(verified=secret)
            self._by_prefix[prefix] = cached
        return cached

    async def _shared(self, name: str, query: Callable[[], Awaitable[T]]) -> T:
        """``await query()``, once for every caller that asks under ``name`` while it
        runs: requests that find the same cached answer stale share one database read
        (each used to send its own), and a caller that is cancelled does not cancel it
        for the others. Names: a key prefix, ``id:`` and a key id, or ``*`` for the count of
        keys."""
        pending = self._queries.get(name)
        # A finished one is not shared: its callback (which forgets it) may not have run
        # yet, and a caller that wants a newer answer (any_exist) would await it again
        # and again without ever yielding to the loop that runs the callback.
        if pending is None or pending.done():
            pending = asyncio.ensure_future(query())
            self._queries[name] = pending
            pending.add_done_callback(partial(self._forget_query, name))
        async with asyncio.timeout(self._timeout):
            result: T = await asyncio.shield(pending)
        return result

    def _forget_query(self, name: str, done: asyncio.Future[Any]) -> None:
        if self._queries.get(name) is done:  # not a newer query under the same name
            del self._queries[name]

    async def _query_prefix(self, prefix: str) -> _Cached | None:
        """Read the key for ``prefix`` into the cache (None: no such key)."""
        now, forgotten = time.monotonic(), self._forgotten
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(_TABLE).where(_TABLE.c.prefix == prefix))).mappings().first()
        if row is None:
            self._by_prefix.pop(prefix, None)
            return None
        cached = _Cached(now, _to_key(ApiKeyRow(**row)), row["secret_hash"], None)
        if forgotten == self._forgotten:  # no key changed meanwhile: the row is current
            self._by_prefix[prefix] = cached
        return cached

    async def load_cached(self, key_id: str) -> ApiKey | None:
        """A key by id, for library users who put ``api_key_id`` in the context: cached
        like a verified secret (``cache_seconds``), and dropped with it by :meth:`forget`,
        so that a key revoked or changed here (or, with key events, on another replica)
        is read again at its next use. Concurrent reads of one id share one query."""
        cached = self._by_id.get(key_id)
        if cached is None or time.monotonic() - cached[0] > self._cache_seconds:
            cached = await self._shared(f"id:{key_id}", lambda: self._query_id(key_id))
        return cached[1]

    async def _query_id(self, key_id: str) -> tuple[float, ApiKey | None]:
        """Read the key ``key_id`` into the cache, unless a key changed meanwhile (the
        read may have seen the row as it was, as in :meth:`_query_prefix`)."""
        now, forgotten = time.monotonic(), self._forgotten
        key = await self._load(key_id)
        cached = (now, key)
        if forgotten == self._forgotten:
            self._by_id[key_id] = cached
            if key is not None:
                self._id_of_prefix[key.prefix] = key_id
        return cached

    async def _load(self, key_id: str) -> ApiKey | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(_TABLE).where(_TABLE.c.id == key_id))).mappings().first()
        return _to_key(ApiKeyRow(**row)) if row else None


def _new_secret() -> tuple[str, str]:
    """A new key's public prefix and its secret."""
    prefix = "".join(secrets.choice(_ALPHABET) for _ in range(_PREFIX_LEN))
    return prefix, f"{SECRET_PREFIX}{prefix}-{secrets.token_urlsafe(32)}"


def _stored_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The row's columns for a key's checked fields."""
    budget = fields["budget"]
    return {
        **fields,
        "scopes": ",".join(sorted(set(fields["scopes"]))),
        "allowed_models": ",".join(fields["allowed_models"])
        if fields["allowed_models"] is not None
        else None,
        "budget_period": (fields["budget_period"] or "month") if budget is not None else None,
    }


def _revoked(key: ApiKey) -> InvalidRequestError:
    return InvalidRequestError(
        f"API key {key.id} ({key.name}) is revoked: create a new one", status=409, code="key_revoked"
    )
