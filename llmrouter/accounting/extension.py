"""The accounting extension for the service: authentication, hooks and HTTP routes.

Routes (OpenAI-style error bodies on failure):

- ``GET /v1/usage?since=&until=&by=day,model&user=`` — the caller's own usage and budgets.
- ``GET /v1/admin/usage?since=&until=&by=key,model,provider,day,user&key=&user=`` — everyone's (admin).
- ``POST /v1/admin/keys`` — create a key; the response carries the secret, once (admin).
- ``GET /v1/admin/keys?limit=&after=&include_revoked=`` — list keys, a page at a time
  (admin); ``GET /v1/admin/keys/{key}`` — one (admin).
- ``PATCH /v1/admin/keys/{key}`` — change a key's fields; it keeps its secret (admin).
- ``POST /v1/admin/keys/{key}/rotate`` — a new secret, shown once, for the same key (admin).
- ``DELETE /v1/admin/keys/{key}`` — revoke by id, prefix or name (admin).

Litestar is imported only here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

import msgspec
from litestar import Request, Response, delete, get, patch, post
from litestar.params import FromPath
from msgspec import UNSET, UnsetType

from llmrouter.accounting.facade import Accounting
from llmrouter.accounting.hooks import unavailable
from llmrouter.accounting.keys import MAX_EXPIRES_AT, UPDATABLE, ApiKey, shown_reference
from llmrouter.accounting.reports import parse_range
from llmrouter.context import RequestContext
from llmrouter.errors import (
    AuthenticationError,
    InvalidRequestError,
    LLMRouterError,
    NotFoundError,
    PermissionDeniedError,
)
from llmrouter.extension import Extension, Gauge
from llmrouter.hooks import RouterHooks
from llmrouter.server.body import read_body
from llmrouter.server.openapi import documented_body
from llmrouter.server.state import header_dict
from llmrouter.types import error_param, json_fault

__all__ = ["AccountingExtension", "CreateKeyRequest", "UpdateKeyRequest", "secret_from_headers"]

_encode = msgspec.json.Encoder().encode
T = TypeVar("T")


class CreateKeyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/admin/keys``."""

    name: str
    scopes: list[Literal["admin", "user"]] = msgspec.field(default_factory=lambda: ["user"])
    allowed_models: list[str] | None = None
    expires_at: float | None = None
    """Unix seconds."""
    expires_in_days: float | None = None
    budget: float | None = None
    budget_period: Literal["day", "month", "total"] | None = None
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    note: str | None = None


class UpdateKeyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``PATCH /v1/admin/keys/{key}``: a field left out stays as it is; ``null``
    clears one that may be empty (``allowed_models``, ``expires_at``, ``budget``, ``rpm``,
    ``tpm``, ``concurrency``, ``note``)."""

    name: str | UnsetType = UNSET
    scopes: list[Literal["admin", "user"]] | UnsetType = UNSET
    allowed_models: list[str] | UnsetType | None = UNSET
    expires_at: float | UnsetType | None = UNSET
    expires_in_days: float | UnsetType = UNSET
    budget: float | UnsetType | None = UNSET
    budget_period: Literal["day", "month", "total"] | UnsetType = UNSET
    rpm: int | UnsetType | None = UNSET
    tpm: int | UnsetType | None = UNSET
    concurrency: int | UnsetType | None = UNSET
    note: str | UnsetType | None = UNSET

    def changes(self, now: float) -> dict[str, Any]:
        """The fields to change, for :meth:`~llmrouter.accounting.keys.KeyStore.update`."""
        found = {name: value for name in UPDATABLE if (value := getattr(self, name)) is not UNSET}
        if self.expires_in_days is not UNSET:
            if "expires_at" in found:
                raise InvalidRequestError(
                    "give expires_at or expires_in_days, not both", param="expires_in_days"
                )
            found["expires_at"] = _expiry(None, self.expires_in_days, now)
        elif found.get("expires_at") is not None:
            found["expires_at"] = _expiry(found["expires_at"], None, now)
        return found


def _decode(body: bytes, kind: type[T], what: str) -> T:
    """``body`` as ``kind``; any fault is a 400 naming the field where msgspec can."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(f"invalid {what}: {exc}", param=error_param(exc)) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"invalid {what}: {json_fault(body, exc)}") from exc
    except UnicodeDecodeError as exc:  # msgspec's, for a string that is not UTF-8
        raise InvalidRequestError(f"invalid {what}: the body is not valid UTF-8") from exc


def _expiry(expires_at: float | None, expires_in_days: float | None, now: float) -> float | None:
    """When a key expires. A time already past is refused: a typo would make a key that
    fails from its next use."""
    if expires_in_days is not None:
        if expires_at is not None:
            raise InvalidRequestError("give expires_at or expires_in_days, not both", param="expires_in_days")
        if not expires_in_days > 0:  # NaN fails too
            raise InvalidRequestError("expires_in_days must be more than 0", param="expires_in_days")
        expires = now + expires_in_days * 86400
        # Checked as computed: a tiny number of days (1e-300) adds nothing to now, and the
        # key would be expired from its first use; a huge one goes past what a date can
        # show (or to infinity), which the store would refuse naming expires_at, a field
        # the request did not send.
        if not now < expires <= MAX_EXPIRES_AT:
            raise InvalidRequestError(
                "expires_in_days must give a time after now and no later than 9999-12-31T23:59:59Z",
                param="expires_in_days",
            )
        return expires
    if expires_at is not None and expires_at <= now:
        raise InvalidRequestError("expires_at (Unix seconds) is in the past", param="expires_at")
    return expires_at


PAGE_SIZE = 100
"""Keys a ``GET /v1/admin/keys`` page holds unless ``limit`` says otherwise (at most 1,000)."""


def _page_size(text: str | None) -> int:
    if text is None:
        return PAGE_SIZE
    try:
        size = int(text)
    except ValueError:
        size = 0
    if not 1 <= size <= 1000:
        raise InvalidRequestError("limit must be a whole number from 1 to 1000", param="limit")
    return size


def secret_from_headers(headers: Mapping[str, str]) -> str | None:
    """The API key from ``Authorization: Bearer …`` or ``X-API-Key`` (``headers``' names
    lowercased, as :meth:`~llmrouter.extension.Extension.authenticate` gets them)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and (value := value.strip()):
            return value
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key and api_key.strip() else None


def key_to_json(key: ApiKey) -> dict[str, Any]:
    data = msgspec.to_builtins(key)
    data["object"] = "api_key"
    data["state"] = key.state()
    return data


def _json(body: Any, status: int = 200) -> Response[bytes]:
    return Response(content=_encode(body), status_code=status, media_type="application/json")


async def _budget_status(acct: Accounting, key: ApiKey | None, end_user: str | None) -> list[dict[str, Any]]:
    """The caller's budgets for ``/v1/usage``: a 503 the client may retry, not a 500,
    while their store (Redis, the database) cannot be read."""
    if acct.budgets is None:
        return []
    try:
        return await acct.budgets.status(key, end_user=end_user)
    except LLMRouterError:
        raise
    except Exception as exc:
        raise unavailable(exc, "reading the caller's budgets") from exc


class AccountingExtension(Extension):
    """Keys, limits, budgets and the ledger for ``llmrouter serve``.

    Args:
        accounting: the (not yet started) :class:`Accounting` to serve.
    """

    name = "accounting"

    def __init__(self, accounting: Accounting) -> None:
        self.accounting = accounting

    def router_hooks(self) -> Sequence[RouterHooks]:
        return (self.accounting.hooks,)

    def gauges(self) -> Mapping[str, Gauge]:
        acct = self.accounting
        return {
            "llmrouter.budget.spent": lambda: [(a, spent) for a, spent, _ in self._budget_gauges()],
            "llmrouter.budget.limit": lambda: [(a, limit) for a, _, limit in self._budget_gauges()],
            "llmrouter.ledger.pending": lambda: [({}, acct.ledger.pending)],
            "llmrouter.accounting.settlements_waiting": lambda: [({}, len(acct.retries))],
        }

    def _budget_gauges(self) -> list[tuple[dict[str, str], float, float]]:
        budgets = self.accounting.budgets
        return budgets.gauges() if budgets is not None else []

    async def startup(self) -> None:
        await self.accounting.start()

    async def shutdown(self) -> None:
        await self.accounting.aclose()

    def readiness(self) -> Mapping[str, Any]:
        return self.accounting.readiness()

    async def check(self) -> Mapping[str, Any]:
        return {**self.accounting.readiness(), **await self.accounting.check_stores()}

    async def authenticate(self, ctx: RequestContext, headers: Mapping[str, str]) -> None:
        """Attach the caller's key; 401 when auth is on and the key is missing or bad.

        With auth off, a valid llmrouter key is still attached (usage is attributed),
        and anything else (``Bearer sk-no-key``, as SDKs send) is ignored.
        """
        secret = secret_from_headers(headers)
        try:
            required = await self.accounting.auth_required()
        except Exception as exc:  # the key store's database is down: 503, not 500
            raise unavailable(exc, "authenticating a request") from exc
        if secret is None:
            if required:
                raise AuthenticationError(
                    "missing API key: send `Authorization: Bearer sk-llmr-...` or `X-API-Key`",
                    code="missing_api_key",
                )
            return
        try:
            key = await self.accounting.authenticate(secret)
        except AuthenticationError:
            if required:
                raise
            return
        except LLMRouterError:
            raise
        except Exception as exc:
            raise unavailable(exc, "authenticating a request") from exc
        ctx.principal = key
        ctx.api_key_id = key.id

    async def _caller(self, request: Request[Any, Any, Any], *, admin: bool) -> ApiKey | None:
        ctx = RequestContext()
        await self.authenticate(ctx, header_dict(request.scope["headers"]))
        key = ctx.principal if isinstance(ctx.principal, ApiKey) else None
        if admin and key is not None and not key.has_scope("admin"):
            raise PermissionDeniedError(
                "this endpoint needs an API key with the admin scope", code="admin_required"
            )
        if admin and key is None and await self.accounting.auth_required():
            raise AuthenticationError("missing API key", code="missing_api_key")
        return key

    def route_handlers(self) -> Sequence[Any]:
        ext = self
        acct = self.accounting

        def time_range(request: Request[Any, Any, Any]) -> tuple[float | None, float | None]:
            query = request.query_params
            return parse_range(query.get("since"), query.get("until"))

        def dimensions(request: Request[Any, Any, Any], default: str) -> list[str]:
            return [d for d in (request.query_params.get("by") or default).split(",") if d.strip()]

        @get("/v1/usage", summary="The caller's usage (by day and model) and budgets")
        async def own_usage(request: Request[Any, Any, Any]) -> Response[bytes]:
            key = await ext._caller(request, admin=False)
            since, until = time_range(request)
            by = [d for d in dimensions(request, "day,model") if d != "key"]
            end_user = request.query_params.get("user") or None
            rows = await acct.usage(
                by=by,
                since=since,
                until=until,
                key_id=key.id if key else None,
                anonymous=key is None,
                end_user=end_user,
            )
            budgets = await _budget_status(acct, key, end_user)
            return _json(
                {
                    "object": "usage",
                    "key": key_to_json(key) if key else None,
                    "since": since,
                    "until": until,
                    "data": rows,
                    "budgets": budgets,
                }
            )

        @get("/v1/admin/usage", summary="Everyone's usage, grouped (admin)")
        async def admin_usage(request: Request[Any, Any, Any]) -> Response[bytes]:
            await ext._caller(request, admin=True)
            since, until = time_range(request)
            key_filter = request.query_params.get("key")
            key_id = None
            if key_filter:
                found = await acct.keys.get(key_filter)
                if found is None:
                    raise InvalidRequestError(f"no API key {shown_reference(key_filter)!r}", param="key")
                key_id = found.id
            rows = await acct.usage(
                by=dimensions(request, "key,model"),
                since=since,
                until=until,
                key_id=key_id,
                end_user=request.query_params.get("user") or None,
            )
            return _json({"object": "usage", "since": since, "until": until, "data": rows})

        @post(
            "/v1/admin/keys",
            summary="Create an API key (the secret is shown once)",
            status_code=201,
            dependencies=documented_body(
                CreateKeyRequest,
                {"name": "ci-bot", "scopes": ["user"], "budget": 5.0, "budget_period": "month"},
            ),
        )
        async def create_key(request: Request[Any, Any, Any]) -> Response[bytes]:
            await ext._caller(request, admin=True)
            body = _decode(await read_body(request), CreateKeyRequest, "key request")
            key, secret = await acct.keys.create(
                body.name,
                scopes=body.scopes,
                allowed_models=body.allowed_models,
                expires_at=_expiry(body.expires_at, body.expires_in_days, time.time()),
                budget=body.budget,
                budget_period=body.budget_period,
                rpm=body.rpm,
                tpm=body.tpm,
                concurrency=body.concurrency,
                note=body.note,
            )
            return _json({**key_to_json(key), "secret": secret}, status=201)

        @get("/v1/admin/keys", summary="List API keys, a page at a time (admin)")
        async def list_keys(request: Request[Any, Any, Any]) -> Response[bytes]:
            await ext._caller(request, admin=True)
            query = request.query_params
            limit = _page_size(query.get("limit"))
            keys = await acct.keys.list(
                include_revoked=query.get("include_revoked", "true").lower() not in ("false", "0", "no"),
                limit=limit + 1,  # one more says whether there is a next page
                after=query.get("after") or None,
            )
            page = keys[:limit]
            return _json(
                {
                    "object": "list",
                    "data": [key_to_json(k) for k in page],
                    "first_id": page[0].id if page else None,
                    "last_id": page[-1].id if page else None,
                    "has_more": len(keys) > limit,
                }
            )

        @delete("/v1/admin/keys/{key_ref:str}", summary="Revoke an API key (admin)", status_code=200)
        async def revoke_key(request: Request[Any, Any, Any], key_ref: FromPath[str]) -> Response[bytes]:
            await ext._caller(request, admin=True)
            return _json(key_to_json(await acct.keys.revoke(key_ref)))

        @get("/v1/admin/keys/{key_ref:str}", summary="One API key, by id, prefix or name (admin)")
        async def get_key(request: Request[Any, Any, Any], key_ref: FromPath[str]) -> Response[bytes]:
            await ext._caller(request, admin=True)
            key = await acct.keys.get(key_ref)
            if key is None:
                raise NotFoundError(f"no API key {shown_reference(key_ref)!r}", code="key_not_found")
            return _json(key_to_json(key))

        @patch(
            "/v1/admin/keys/{key_ref:str}",
            summary="Change an API key's fields (admin)",
            dependencies=documented_body(UpdateKeyRequest, {"rpm": 120, "note": "raised for the launch"}),
        )
        async def update_key(request: Request[Any, Any, Any], key_ref: FromPath[str]) -> Response[bytes]:
            await ext._caller(request, admin=True)
            body = _decode(await read_body(request), UpdateKeyRequest, "key update")
            return _json(key_to_json(await acct.keys.update(key_ref, body.changes(time.time()))))

        @post(
            "/v1/admin/keys/{key_ref:str}/rotate",
            summary="Give an API key a new secret (shown once) (admin)",
            status_code=200,
        )
        async def rotate_key(request: Request[Any, Any, Any], key_ref: FromPath[str]) -> Response[bytes]:
            await ext._caller(request, admin=True)
            key, secret = await acct.keys.rotate(key_ref)
            return _json({**key_to_json(key), "secret": secret})

        return [own_usage, admin_usage, create_key, list_keys, get_key, update_key, rotate_key, revoke_key]
