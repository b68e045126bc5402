"""Accounting in the service: auth headers, admin key API, 401/403/429 bodies, usage endpoints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from litestar.testing import AsyncTestClient

from llmrouter.accounting import Accounting, extension_from_config
from llmrouter.accounting.config import RedisConfig
from llmrouter.accounting.extension import AccountingExtension, secret_from_headers
from llmrouter.accounting.ledger import row_from_context
from llmrouter.config import Config, Deployment, Price, parse_config
from llmrouter.extension import Extension
from llmrouter.router import Router
from llmrouter.server import create_app
from llmrouter.testing.scripted import ScriptedProvider, Step

from .conftest import chat_context, finish, make_config

pytestmark = pytest.mark.anyio

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


def _app(
    sqlite_url: str, tmp_path: Path, *, also: Sequence[Extension] = (), **accounting: Any
) -> tuple[object, Accounting]:
    """The service with accounting (configured by ``accounting``) and the extensions ``also``."""
    router = Router()
    router.add_deployment(
        "gpt-4o-mini",
        ScriptedProvider("gpt-4o-mini", default=Step(text="hello there")),
        Deployment(provider="scripted", model="gpt-4o-mini", price=Price(input=0.15, output=0.6)),
    )
    acct = Accounting(make_config(sqlite_url, tmp_path, **accounting))
    return create_app(Config(), router=router, extensions=[AccountingExtension(acct), *also]), acct


def test_secret_from_headers() -> None:
    assert secret_from_headers({"authorization": "Bearer sk-llmr-a"}) == "sk-llmr-a"
    assert secret_from_headers({"x-api-key": " sk-llmr-b "}) == "sk-llmr-b"
    assert secret_from_headers({"authorization": "Basic abc"}) is None
    assert secret_from_headers({}) is None


def test_extension_from_config() -> None:
    assert isinstance(extension_from_config(Config()), AccountingExtension)
    assert extension_from_config(parse_config({"accounting": {"enabled": False}}, env={})) is None


async def test_service_keys_auth_limits_and_usage(sqlite_url: str, tmp_path: Path) -> None:
    app, acct = _app(sqlite_url, tmp_path)
    async with AsyncTestClient(app) as client:
        # no key exists yet: a local single-user setup, SDK placeholder keys are ignored
        response = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-no-key"}
        )
        assert response.status_code == 200, response.text
        created = await client.post("/v1/admin/keys", json={"name": "root", "scopes": ["admin"]})
        assert created.status_code == 201, created.text
        admin = {"Authorization": f"Bearer {created.json()['secret']}"}

        # a key exists: auth is on
        denied = await client.post("/v1/chat/completions", json=CHAT)
        assert denied.status_code == 401
        assert denied.json()["error"]["type"] == "authentication_error"
        bad = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"X-API-Key": "sk-llmr-abcdefgh-nope"}
        )
        assert bad.status_code == 401 and "nope" not in bad.text

        user = await client.post(
            "/v1/admin/keys",
            headers=admin,
            json={
                "name": "app",
                "rpm": 2,
                "allowed_models": ["gpt-4o-mini"],
                "budget": 1.0,
                "budget_period": "day",
            },
        )
        user_info = user.json()
        user_headers = {"X-API-Key": user_info["secret"]}
        first = await client.post("/v1/chat/completions", json=CHAT, headers=user_headers)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert "x-ratelimit-limit-tokens" not in first.headers  # no TPM limit
        streamed = await client.post(
            "/v1/chat/completions", json={**CHAT, "stream": True}, headers=user_headers
        )
        assert streamed.status_code == 200 and streamed.headers["x-ratelimit-remaining-requests"] == "0"
        limited = await client.post("/v1/chat/completions", json=CHAT, headers=user_headers)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.headers["x-ratelimit-limit-requests"] == "2"
        assert limited.headers["x-ratelimit-remaining-requests"] == "0"
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"

        # the user sees only their own usage, and may not use admin endpoints
        own = await client.get("/v1/usage", headers=user_headers)
        assert own.status_code == 200, own.text
        body = own.json()
        assert body["key"]["name"] == "app" and "secret" not in body["key"]
        ok_rows = [r for r in body["data"] if r["model"] == "gpt-4o-mini"]
        assert sum(r["requests"] for r in ok_rows) == 3  # 2 served + 1 rejected (not billed)
        assert sum(r["cost"] for r in ok_rows) > 0
        assert body["budgets"][0]["limit"] == 1.0 and body["budgets"][0]["spent"] > 0
        forbidden = await client.get("/v1/admin/usage", headers=user_headers)
        assert forbidden.status_code == 403 and forbidden.json()["error"]["type"] == "permission_error"

        everyone = await client.get("/v1/admin/usage?by=key,model&since=7d", headers=admin)
        assert everyone.status_code == 200
        names = {r["key_name"] for r in everyone.json()["data"]}
        assert names == {None, "app"}  # the anonymous request before auth, and the app key
        bad_by = await client.get("/v1/admin/usage?by=colour", headers=admin)
        assert bad_by.status_code == 400

        listed = await client.get("/v1/admin/keys", headers=admin)
        assert {k["name"] for k in listed.json()["data"]} == {"root", "app"}
        assert all("secret" not in k and "secret_hash" not in k for k in listed.json()["data"])
        revoked = await client.delete(f"/v1/admin/keys/{user_info['id']}", headers=admin)
        assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
        gone = await client.post("/v1/chat/completions", json=CHAT, headers=user_headers)
        assert gone.status_code == 401
        invalid = await client.post("/v1/admin/keys", headers=admin, json={"name": "x", "scopes": ["root"]})
        assert invalid.status_code == 400
        for _ in range(2):
            assert (
                await client.post("/v1/admin/keys", headers=admin, json={"name": "twin"})
            ).status_code == 201
        ambiguous = await client.delete("/v1/admin/keys/twin", headers=admin)
        assert ambiguous.status_code == 409 and ambiguous.json()["error"]["code"] == "ambiguous_key"
        unfiltered = await client.get("/v1/admin/usage?key=twin", headers=admin)
        assert unfiltered.status_code == 409
    assert acct.ledger.pending == 0  # flushed on shutdown


async def test_service_changes_and_rotates_keys(sqlite_url: str, tmp_path: Path) -> None:
    app, _acct = _app(sqlite_url, tmp_path)
    async with AsyncTestClient(app) as client:
        root = (await client.post("/v1/admin/keys", json={"name": "root", "scopes": ["admin"]})).json()
        admin = {"Authorization": f"Bearer {root['secret']}"}
        app_key = (await client.post("/v1/admin/keys", headers=admin, json={"name": "app", "rpm": 1})).json()
        user = {"Authorization": f"Bearer {app_key['secret']}"}
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=user)).status_code == 200
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=user)).status_code == 429

        raised = await client.patch(
            "/v1/admin/keys/app", headers=admin, json={"rpm": 5, "note": "raised", "expires_in_days": 30}
        )
        assert raised.status_code == 200, raised.text
        body = raised.json()
        assert (body["id"], body["rpm"], body["note"], body["state"]) == (
            app_key["id"],
            5,
            "raised",
            "active",
        )
        assert "secret" not in body and body["expires_at"] > 0
        served = await client.post("/v1/chat/completions", json=CHAT, headers=user)  # the same secret
        assert served.status_code == 200 and served.headers["x-ratelimit-limit-requests"] == "5"

        one = await client.get("/v1/admin/keys/app", headers=admin)
        assert one.status_code == 200 and one.json()["rpm"] == 5 and "secret" not in one.json()
        assert (await client.get("/v1/admin/keys/nobody", headers=admin)).status_code == 404
        assert (await client.get("/v1/admin/keys/app", headers=user)).status_code == 403
        first = (await client.get("/v1/admin/keys?limit=1", headers=admin)).json()
        assert [k["name"] for k in first["data"]] == ["root"] and first["has_more"]
        rest = (await client.get(f"/v1/admin/keys?limit=1&after={first['last_id']}", headers=admin)).json()
        assert [k["name"] for k in rest["data"]] == ["app"] and not rest["has_more"]
        assert rest["first_id"] == rest["last_id"] == app_key["id"]
        for bad in ("limit=0", "limit=1001", "limit=ten", "after=key_none", "after=%00"):
            refused = await client.get(f"/v1/admin/keys?{bad}", headers=admin)
            assert refused.status_code == 400, (bad, refused.text)

        cleared = await client.patch(
            "/v1/admin/keys/app", headers=admin, json={"rpm": None, "expires_at": None}
        )
        assert (cleared.json()["rpm"], cleared.json()["expires_at"]) == (None, None)
        assert (
            "x-ratelimit-limit-requests"
            not in (await client.post("/v1/chat/completions", json=CHAT, headers=user)).headers
        )

        for change, param in (
            ({"rpm": 0}, "rpm"),
            ({"name": None}, "name"),
            ({"colour": "red"}, "colour"),
            ({"budget_period": "day"}, "budget_period"),
            ({"expires_at": 1.0}, "expires_at"),
            ({"expires_at": 4e9, "expires_in_days": 1}, "expires_in_days"),
        ):
            refused = await client.patch("/v1/admin/keys/app", headers=admin, json=change)
            assert refused.status_code == 400, (change, refused.text)
            assert refused.json()["error"]["param"] == param, refused.text
        not_json = await client.patch("/v1/admin/keys/app", headers=admin, content=b"{")
        assert not_json.status_code == 400
        lone = await client.patch("/v1/admin/keys/app", headers=admin, content=b'{"name": "\\ud800"}')
        assert lone.status_code == 400 and "unpaired UTF-16 surrogate" in lone.json()["error"]["message"]
        assert (await client.patch("/v1/admin/keys/nobody", headers=admin, json={})).status_code == 404
        assert (await client.patch("/v1/admin/keys/app", headers=user, json={"rpm": 9})).status_code == 403
        assert (await client.post("/v1/admin/keys/app/rotate", headers=user)).status_code == 403

        rotated = await client.post("/v1/admin/keys/app/rotate", headers=admin)
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()
        assert new["id"] == app_key["id"] and new["secret"] != app_key["secret"]
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=user)).status_code == 401
        fresh = {"Authorization": f"Bearer {new['secret']}"}
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=fresh)).status_code == 200
        own = (await client.get("/v1/usage", headers=fresh)).json()
        assert sum(r["requests"] for r in own["data"]) == 5  # the usage before the rotation stays the key's

        await client.delete("/v1/admin/keys/app", headers=admin)
        for response in (
            await client.patch("/v1/admin/keys/app", headers=admin, json={"rpm": 3}),
            await client.post("/v1/admin/keys/app/rotate", headers=admin),
        ):
            assert response.status_code == 409 and response.json()["error"]["code"] == "key_revoked"


async def test_usage_by_end_user(sqlite_url: str, tmp_path: Path) -> None:
    """The OpenAI ``user`` field of each request is on its ledger row: reports group and
    filter by it."""
    app, _acct = _app(sqlite_url, tmp_path)
    async with AsyncTestClient(app) as client:
        for field, user, stream in (
            ("user", "user-1", False),
            ("user", "user-1", True),
            ("user", "user-2", False),
            ("safety_identifier", "user-3", False),  # OpenAI's newer name for it
            ("user", None, False),
        ):
            body = {**CHAT, "stream": stream, **({field: user} if user else {})}
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        everyone = (await client.get("/v1/admin/usage?by=user")).json()["data"]
        assert {r["user"]: r["requests"] for r in everyone} == {
            None: 1,
            "user-1": 2,
            "user-2": 1,
            "user-3": 1,
        }
        one = (await client.get("/v1/usage?by=model&user=user-1")).json()["data"]
        assert [(r["model"], r["requests"]) for r in one] == [("gpt-4o-mini", 2)]
        assert one[0]["cost"] > 0


async def test_an_end_users_budget_through_the_service(sqlite_url: str, tmp_path: Path) -> None:
    from llmrouter.accounting.config import BudgetRule

    # gpt-4o-mini at $0.15 / $0.60 per million: a request may cost ~$0.000011 and costs less.
    rules = [BudgetRule(key="*", user="*", period="day", limit=0.00002)]
    app, _acct = _app(sqlite_url, tmp_path, budgets=rules)
    async with AsyncTestClient(app) as client:
        statuses = [
            (await client.post("/v1/chat/completions", json={**CHAT, "user": "user-1"})).status_code
            for _ in range(8)
        ]
        served = statuses.index(429)
        assert served >= 2 and statuses[served:] == [429] * (8 - served)
        refused = await client.post("/v1/chat/completions", json={**CHAT, "user": "user-1"})
        assert "for end user 'user-1'" in refused.json()["error"]["message"]
        assert (await client.post("/v1/chat/completions", json={**CHAT, "user": "user-2"})).status_code == 200
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200  # no user: no cap
        [budget] = (await client.get("/v1/usage?user=user-1")).json()["budgets"]
        assert budget["user"] == "user-1" and budget["limit"] == 0.00002 and 0 < budget["spent"] <= 0.00002
        assert (await client.get("/v1/usage")).json()["budgets"] == []


async def test_usage_lists_every_budget_of_the_key_per_model_ones_included(
    sqlite_url: str, tmp_path: Path
) -> None:
    from llmrouter.accounting.config import BudgetRule

    rules = [
        BudgetRule(key="app", model="gpt-4o-mini", period="day", limit=2.0),
        BudgetRule(key="app", period="month", limit=50.0),
    ]
    app, _acct = _app(sqlite_url, tmp_path, budgets=rules)
    async with AsyncTestClient(app) as client:
        admin = await _admin_headers(client)
        created = await client.post("/v1/admin/keys", json={"name": "app"}, headers=admin)
        user = {"Authorization": f"Bearer {created.json()['secret']}"}
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=user)).status_code == 200
        budgets = (await client.get("/v1/usage", headers=user)).json()["budgets"]
        by_model = {(b["model"], b["period"]): b for b in budgets}
        assert set(by_model) == {("gpt-4o-mini", "day"), (None, "month")}
        assert by_model[("gpt-4o-mini", "day")]["limit"] == 2.0
        assert by_model[("gpt-4o-mini", "day")]["spent"] > 0


async def test_a_request_larger_than_the_keys_tpm_is_refused_as_never_fitting(
    sqlite_url: str, tmp_path: Path
) -> None:
    """No wait admits a prompt of more tokens than the key may send in a minute: the 429
    says so, with the numbers, and tells the OpenAI SDKs not to retry."""
    app, _acct = _app(sqlite_url, tmp_path)
    async with AsyncTestClient(app) as client:
        admin = await _admin_headers(client)
        created = await client.post("/v1/admin/keys", json={"name": "small", "tpm": 1}, headers=admin)
        user = {"Authorization": f"Bearer {created.json()['secret']}"}
        refused = await client.post("/v1/chat/completions", json=CHAT, headers=user)
        assert refused.status_code == 429
        message = refused.json()["error"]["message"]
        assert message.startswith("request too large") and "limit 1, requested " in message
        assert refused.headers["x-should-retry"] == "false"
        assert "retry-after" not in refused.headers
        assert refused.headers["x-ratelimit-limit-tokens"] == "1"


async def test_a_key_that_would_expire_as_it_is_made_is_refused(sqlite_url: str, tmp_path: Path) -> None:
    """``expires_in_days`` above 0 but too small to move the clock (1e-300 days) gave a
    201 for a key expired from its first use; one too large gave a 400 naming expires_at."""
    app, acct = _app(sqlite_url, tmp_path)
    async with AsyncTestClient(app) as client:
        admin = await _admin_headers(client)
        for days in (1e-300, 1e305):
            for method, url in (("POST", "/v1/admin/keys"), ("PATCH", "/v1/admin/keys/root")):
                body = {"expires_in_days": days, **({"name": "k"} if method == "POST" else {})}
                response = await client.request(method, url, json=body, headers=admin)
                assert response.status_code == 400, (days, method, response.text)
                assert response.json()["error"]["param"] == "expires_in_days"
        assert [k.name for k in await acct.keys.list()] == ["root"]
        [root] = await acct.keys.list()
        assert root.expires_at is None


async def test_the_admin_api_documents_its_request_bodies(sqlite_url: str, tmp_path: Path) -> None:
    app, _ = _app(sqlite_url, tmp_path)
    async with AsyncTestClient(app) as client:
        paths = (await client.get("/schema/openapi.json")).json()["paths"]
    for path, method, struct in (
        ("/v1/admin/keys", "post", "CreateKeyRequest"),
        ("/v1/admin/keys/{key_ref}", "patch", "UpdateKeyRequest"),
    ):
        body = paths[path][method]["requestBody"]["content"]["application/json"]["schema"]
        assert body["allOf"] == [{"$ref": f"#/components/schemas/{struct}"}]


async def _admin_headers(client: Any) -> dict[str, str]:
    """Create the first key, an admin one (auth is off until then); its headers."""
    created = await client.post("/v1/admin/keys", json={"name": "root", "scopes": ["admin"]})
    assert created.status_code == 201, created.text
    return {"Authorization": f"Bearer {created.json()['secret']}"}


async def test_a_nul_in_a_key_reference_or_user_filter_is_not_a_500(db_url: str, tmp_path: Path) -> None:
    """PostgreSQL refuses a string holding NUL: each of these was a 500 there."""
    app, _acct = _app(db_url, tmp_path)
    async with AsyncTestClient(app) as client:
        sent = {**CHAT, "user": "a\x00b"}
        assert (await client.post("/v1/chat/completions", json=sent)).status_code == 200
        rows = (await client.get("/v1/admin/usage?by=user&user=a%00b")).json()["data"]
        assert [(r["user"], r["requests"]) for r in rows] == [("ab", 1)]  # as the ledger keeps it
        assert (await client.get("/v1/usage?user=%00")).status_code == 200
        assert (await client.get("/v1/admin/usage?key=a%00b")).status_code == 400
        for method in ("GET", "PATCH", "DELETE"):
            response = await client.request(
                method, "/v1/admin/keys/a%00b", json={} if method == "PATCH" else None
            )
            assert response.status_code == 404, (method, response.text)
        assert (await client.post("/v1/admin/keys/a%00b/rotate")).status_code == 404
        bad = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"X-API-Key": "sk-llmr-ab\x01defgh-xyz"}
        )
        assert bad.status_code == 200  # auth is off (no key yet): a malformed key is ignored


async def test_a_failing_store_answers_503_not_500(sqlite_url: str, tmp_path: Path) -> None:
    """Redis or the database down: a retryable 503 in OpenAI's shape, and a rejected row."""
    from llmrouter.accounting.config import BudgetRule

    router = Router()
    router.add_deployment(
        "gpt-4o-mini",
        ScriptedProvider("gpt-4o-mini", default=Step(text="hello there")),
        Deployment(provider="scripted", model="gpt-4o-mini", price=Price(input=0.15, output=0.6)),
    )
    acct = Accounting(
        make_config(sqlite_url, tmp_path, budgets=[BudgetRule(limit=10.0)], budget_backend="memory")
    )
    app = create_app(Config(), router=router, extensions=[AccountingExtension(acct)])

    async def down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("connection refused")

    async with AsyncTestClient(app) as client:
        assert acct.budgets is not None
        acct.budgets.store.reserve = down  # type: ignore[method-assign]
        refused = await client.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["type"] == "service_unavailable"
        assert refused.json()["error"]["code"] == "accounting_unavailable"
        assert refused.headers["retry-after"] == "1" and "connection refused" not in refused.text

        acct.keys.any_exist = down  # type: ignore[method-assign]  # the key store's database
        refused = await client.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "accounting_unavailable"

        await acct.ledger.flush()
        rows = await acct.usage(by=["status"])
    assert {r["status"]: r["requests"] for r in rows} == {"rejected": 1}  # the one that reached the hooks


def _unavailable(response: Any) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "accounting_unavailable"
    assert response.headers["retry-after"] == "1"


async def test_usage_is_a_503_while_its_stores_cannot_be_read(sqlite_url: str, tmp_path: Path) -> None:
    """The ledger's database or the budgets' store unreachable: ``/v1/usage`` and
    ``/v1/admin/usage`` were 500 ``internal_error``, with a traceback in the log."""
    from llmrouter.accounting.config import BudgetRule
    from llmrouter.accounting.db import create_engine

    app, acct = _app(sqlite_url, tmp_path, budgets=[BudgetRule(limit=10.0)], budget_backend="memory")

    async def down(*args: object) -> None:
        raise ConnectionError("connection refused")

    async with AsyncTestClient(app) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        ledger_db, acct.engine = acct.engine, create_engine("postgresql+asyncpg://postgres@127.0.0.1:9/acct")
        try:
            _unavailable(await client.get("/v1/usage"))
            _unavailable(await client.get("/v1/admin/usage"))
        finally:
            await acct.engine.dispose()
            acct.engine = ledger_db
        assert (await client.get("/v1/usage")).status_code == 200
        assert acct.budgets is not None
        acct.budgets.store.usage = down  # type: ignore[method-assign,assignment]  # Redis, say
        _unavailable(await client.get("/v1/usage"))


async def test_a_report_is_read_though_the_ledger_cannot_flush(
    acct: Accounting, caplog: pytest.LogCaptureFixture
) -> None:
    """The database refusing this process's queued rows does not keep a report from
    reading what it has (as reading a budget's spend does)."""
    acct.ledger.record(row_from_context(finish(chat_context(), cost=0.001)))
    await acct.ledger.flush()

    async def refused() -> None:
        raise RuntimeError("ledger flush failed: OperationalError: database is locked")

    acct.ledger.flush = refused  # type: ignore[method-assign]
    assert [row["requests"] for row in await acct.usage(by=["status"])] == [1]
    assert "ledger not flushed before reading usage" in caplog.text


async def test_a_report_is_not_cut_at_the_database_timeout(
    acct: Accounting, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everyone's usage of all time over millions of rows takes longer than
    ``database.timeout``, which bounds only reaching the database: with the whole report
    bounded, it was a 503 with ``Retry-After: 1`` every time."""
    from llmrouter.accounting import facade

    acct.config.database.timeout = 0.3

    async def slow_report(engine: object, **kwargs: object) -> list[dict[str, Any]]:
        await anyio.sleep(0.6)  # a large ledger's query: past database.timeout
        return [{"requests": 6_000_000}]

    monkeypatch.setattr(facade, "usage_report", slow_report)
    assert await acct.usage(by=["key", "model"]) == [{"requests": 6_000_000}]


async def test_a_request_without_max_tokens_is_told_where_its_bound_comes_from(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Over a budget that its maximum cost alone exceeds, a request that sent no
    ``max_tokens`` was told to lower it: its bound is the router's default (4096 output
    tokens, here $0.0024576, over $0.002)."""
    from llmrouter.accounting.config import BudgetRule

    app, _acct = _app(sqlite_url, tmp_path, budgets=[BudgetRule(period="day", limit=0.002)])
    unbounded = {key: value for key, value in CHAT.items() if key != "max_tokens"}
    async with AsyncTestClient(app) as client:
        refused = await client.post("/v1/chat/completions", json=unbounded)
        assert refused.status_code == 429 and "retry-after" not in refused.headers
        assert (
            "lower max_tokens (4096 for this request; a request without it is bounded by "
            "router.default_max_tokens)" in refused.json()["error"]["message"]
        )
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_a_key_lists_and_retrieves_only_the_models_it_may_use(sqlite_url: str, tmp_path: Path) -> None:
    router = Router()
    for name in ("gpt-4o-mini", "gpt-4o", "internal-llama"):
        router.add_deployment(
            name, ScriptedProvider(name, default=Step(text="hi")), Deployment(provider="scripted", model=name)
        )
    acct = Accounting(make_config(sqlite_url, tmp_path))
    app = create_app(Config(), router=router, extensions=[AccountingExtension(acct)])
    async with AsyncTestClient(app) as client:
        everything = {"gpt-4o-mini", "gpt-4o", "internal-llama"}
        assert {m["id"] for m in (await client.get("/v1/models")).json()["data"]} == everything  # no keys yet
        admin = (await client.post("/v1/admin/keys", json={"name": "root", "scopes": ["admin"]})).json()
        app_key = (
            await client.post(
                "/v1/admin/keys",
                headers={"X-API-Key": admin["secret"]},
                json={"name": "app", "allowed_models": ["gpt-*"]},
            )
        ).json()
        as_app = {"X-API-Key": app_key["secret"]}
        listed = await client.get("/v1/models", headers=as_app)
        assert {m["id"] for m in listed.json()["data"]} == {"gpt-4o-mini", "gpt-4o"}
        assert (await client.get("/v1/models/gpt-4o", headers=as_app)).status_code == 200
        hidden = await client.get("/v1/models/internal-llama", headers=as_app)
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"
        as_admin = {"X-API-Key": admin["secret"]}  # no allow-list: every model
        assert {
            m["id"] for m in (await client.get("/v1/models", headers=as_admin)).json()["data"]
        } == everything


async def test_ready_is_503_while_a_store_of_accounting_does_not_answer(
    sqlite_url: str, tmp_path: Path
) -> None:
    router = Router()
    router.add_deployment(
        "m", ScriptedProvider("m", default=Step(text="hi")), Deployment(provider="scripted", model="m")
    )
    closed_port = 9  # discard: nothing listens on it here
    redis = RedisConfig(url=f"redis://127.0.0.1:{closed_port}/0", timeout=0.5)
    acct = Accounting(make_config(sqlite_url, tmp_path, redis=redis))
    app = create_app(Config(), router=router, extensions=[AccountingExtension(acct)])
    async with AsyncTestClient(app) as client:
        ready = await client.get("/ready")
        assert ready.status_code == 503, ready.text
        report = ready.json()["extensions"]["accounting"]
        assert (
            report["ready"] is False
            and report["database"] == "ok"
            and report["redis"].startswith("ConnectionError")
        )
        assert ready.json()["deployments"][0]["healthy"] is True  # the model is fine; accounting is not


async def test_budgets_are_gauges_in_metrics(sqlite_url: str, tmp_path: Path) -> None:
    from llmrouter.accounting.config import BudgetRule
    from llmrouter.telemetry import TelemetryConfig
    from llmrouter.telemetry.extension import TelemetryExtension

    telemetry = TelemetryExtension(TelemetryConfig(json_logs=False))
    budgets = [BudgetRule(key="*", period="month", limit=2.5)]
    app, acct = _app(sqlite_url, tmp_path, also=[telemetry], budgets=budgets)
    async with AsyncTestClient(app) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        scrape = (await client.get("/metrics")).text
    window = ('gen_ai_request_model="*"', 'llmrouter_api_key_id="none"', 'llmrouter_budget_period="month"')

    def value(name: str, *labels: str) -> float:
        (line,) = [
            x for x in scrape.splitlines() if x.startswith(name + "{") and all(label in x for label in labels)
        ]
        return float(line.rsplit(" ", 1)[1])

    assert value("llmrouter_budget_limit", *window) == 2.5
    assert value("llmrouter_budget_spent", *window) == acct.budgets.gauges()[0][1] > 0
    # The accounting's own state, unlabelled (each worker's, in a multi-worker serve).
    assert value("llmrouter_accounting_settlements_waiting") == 0
    assert value("llmrouter_ledger_pending") in (0, 1)  # the request's row, written or not yet
