"""The cache in the HTTP service: X-LLMRouter-Cache, Cache-Control, SSE replay, /ready and
the admin route."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from litestar.testing import TestClient

from llmrouter.cache import MemoryBackend, ResponseCache
from llmrouter.cache.extension import CacheExtension, build_cache_extension
from llmrouter.cache.redis import RedisBackend
from llmrouter.cache.sqlite import SQLiteBackend
from llmrouter.config import Config, parse_config
from llmrouter.context import RequestContext
from llmrouter.extension import Extension
from llmrouter.router import Router
from llmrouter.server import create_app
from llmrouter.testing.scripted import ScriptedProvider, Step

CHAT = {"model": "m", "messages": [{"role": "user", "content": "capital of France?"}], "temperature": 0}


@pytest.fixture
def provider() -> ScriptedProvider:
    return ScriptedProvider("upstream-m", default=Step(text="Paris is the capital of France."))


@pytest.fixture
def cache() -> ResponseCache:
    return ResponseCache(MemoryBackend(), ttl=60)


@pytest.fixture
def client(provider: ScriptedProvider, cache: ResponseCache) -> Iterator[TestClient[Any]]:
    router = Router()
    router.add_deployment("m", provider)
    with TestClient(create_app(router=router, extensions=[CacheExtension(cache)])) as test_client:
        yield test_client


def test_header_says_miss_then_hit(client: TestClient[Any], provider: ScriptedProvider) -> None:
    first = client.post("/v1/chat/completions", json=CHAT)
    second = client.post("/v1/chat/completions", json={**CHAT, "user": "someone"})
    assert first.status_code == second.status_code == 200
    assert first.headers["x-llmrouter-cache"] == "miss"
    assert second.headers["x-llmrouter-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert provider.record.calls == 1


def test_cache_control_no_cache_and_no_store(client: TestClient[Any], provider: ScriptedProvider) -> None:
    response = client.post("/v1/chat/completions", json=CHAT, headers={"Cache-Control": "no-store"})
    assert response.headers["x-llmrouter-cache"] == "miss"
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.headers["x-llmrouter-cache"] == "miss"  # no-store kept it out
    response = client.post("/v1/chat/completions", json=CHAT, headers={"Cache-Control": "no-cache"})
    assert response.headers["x-llmrouter-cache"] == "bypass"
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.headers["x-llmrouter-cache"] == "hit"
    assert provider.record.calls == 3
    response = client.post("/v1/chat/completions", json={**CHAT, "temperature": 1})
    assert response.headers["x-llmrouter-cache"] == "bypass"


def test_max_age_and_pragma_ask_for_a_fresh_answer(
    client: TestClient[Any], provider: ScriptedProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client.post("/v1/chat/completions", json=CHAT).headers["x-llmrouter-cache"] == "miss"
    for headers in ({"Cache-Control": "max-age=0"}, {"Pragma": "no-cache"}):
        response = client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert response.headers["x-llmrouter-cache"] == "bypass"
    fresh_enough = {"Cache-Control": "max-age=60"}
    assert (
        client.post("/v1/chat/completions", json=CHAT, headers=fresh_enough).headers["x-llmrouter-cache"]
        == "hit"
    )
    stored_at = time.time()
    monkeypatch.setattr(time, "time", lambda: stored_at + 61)  # the stored answer is now 61 s old
    response = client.post("/v1/chat/completions", json=CHAT, headers=fresh_enough)
    assert response.headers["x-llmrouter-cache"] == "miss"
    assert provider.record.calls == 4


def test_streamed_hit_is_replayed_as_the_same_sse(
    client: TestClient[Any], provider: ScriptedProvider
) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    first = client.post("/v1/chat/completions", json=body)
    second = client.post("/v1/chat/completions", json=body)
    assert first.headers["x-llmrouter-cache"] == "miss"
    assert second.headers["x-llmrouter-cache"] == "hit"
    assert second.text == first.text  # byte for byte, [DONE] included
    assert '"usage"' in second.text and second.text.rstrip().endswith("data: [DONE]")
    assert provider.record.calls == 1


def test_ready_and_admin_report_stats(client: TestClient[Any]) -> None:
    client.post("/v1/chat/completions", json=CHAT)
    client.post("/v1/chat/completions", json=CHAT)
    ready = client.get("/ready").json()
    stats = ready["extensions"]["cache"]
    assert (stats["backend"], stats["hits"], stats["misses"], stats["entries"]) == ("memory", 1, 1, 1)
    admin = client.get("/v1/admin/cache")
    assert admin.status_code == 200 and admin.json()["hits"] == 1
    cleared = client.delete("/v1/admin/cache")
    assert cleared.status_code == 200 and cleared.json() == {"cleared": 1}
    assert client.get("/v1/admin/cache").json()["entries"] == 0
    assert client.post("/v1/chat/completions", json=CHAT).headers["x-llmrouter-cache"] == "miss"


def test_admin_clear_with_the_backend_down_is_a_503(provider: ScriptedProvider) -> None:
    router = Router()
    router.add_deployment("m", provider)
    down = ResponseCache(RedisBackend("redis://127.0.0.1:1/0", timeout=0.5))
    with TestClient(create_app(router=router, extensions=[CacheExtension(down)])) as client:
        cleared = client.delete("/v1/admin/cache")
        assert cleared.status_code == 503 and cleared.headers["retry-after"] == "5"
        assert cleared.json()["error"]["code"] == "cache_unavailable"
        assert client.get("/v1/admin/cache").json()["errors"] == 1


def test_admin_stats_count_the_sqlite_table_every_worker_stores_into(
    provider: ScriptedProvider, sqlite_path: Path
) -> None:
    async def another_worker_stores() -> None:
        other = SQLiteBackend(sqlite_path)
        for key in ("a", "b"):
            await other.set(key, b"answer", None)
        await other.aclose()

    router = Router()
    router.add_deployment("m", provider)
    cache = ResponseCache(SQLiteBackend(sqlite_path))
    with TestClient(create_app(router=router, extensions=[CacheExtension(cache)])) as client:
        client.post("/v1/chat/completions", json=CHAT)
        anyio.run(another_worker_stores)
        assert client.get("/v1/admin/cache").json()["entries"] == 3


class KeyAuth(Extension):
    """Stands in for accounting: the bearer token names the principal's scope."""

    name = "auth"

    class Principal:
        def __init__(self, scope: str) -> None:
            self.scope = scope

        def has_scope(self, scope: str) -> bool:
            return self.scope == "admin" or self.scope == scope

    async def authenticate(self, ctx: RequestContext, headers: Any) -> None:
        token = headers.get("authorization", "").removeprefix("Bearer ")
        ctx.api_key_id = token
        ctx.principal = self.Principal("admin" if token == "admin-key" else "user")


def test_admin_route_needs_an_admin_key(provider: ScriptedProvider, cache: ResponseCache) -> None:
    router = Router()
    router.add_deployment("m", provider)
    with TestClient(create_app(router=router, extensions=[KeyAuth(), CacheExtension(cache)])) as client:
        denied = client.get("/v1/admin/cache", headers={"Authorization": "Bearer user-key"})
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "admin_required"
        assert (
            client.delete("/v1/admin/cache", headers={"Authorization": "Bearer user-key"}).status_code == 403
        )
        assert client.get("/v1/admin/cache", headers={"Authorization": "Bearer admin-key"}).status_code == 200


def test_extension_from_config() -> None:
    assert build_cache_extension(parse_config({"cache": {"backend": "none"}}, env={})) is None
    extension = build_cache_extension(Config())
    assert isinstance(extension, CacheExtension)
    assert extension.cache_layer() is extension.cache
    assert extension.readiness()["backend"] == "memory"
    assert len(extension.route_handlers()) == 2
