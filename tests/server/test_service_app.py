"""The service in-process (Litestar's TestClient) over scripted providers."""

from __future__ import annotations

import gzip
import re
import sqlite3
import warnings
from collections.abc import Iterator, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import get
from litestar.exceptions import LitestarDeprecationWarning
from litestar.testing import TestClient

from llmrouter.config import Config, ServerConfig, parse_config
from llmrouter.context import RequestContext
from llmrouter.errors import AuthenticationError, RateLimitError, UnprocessableEntityError, UpstreamError
from llmrouter.extension import Extension
from llmrouter.hooks import RouterHooks
from llmrouter.router import Router
from llmrouter.server import create_app, default_extensions
from llmrouter.testing.scripted import ScriptedProvider, Step

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


def make_router(*steps: Step, default: Step | None = None) -> tuple[Router, ScriptedProvider]:
    router = Router()
    provider = ScriptedProvider("upstream-m", steps=steps, default=default or Step(echo=True))
    router.add_deployment("m", provider)
    return router, provider


@pytest.fixture
def client() -> Iterator[TestClient[Any]]:
    router, _ = make_router()
    with TestClient(create_app(router=router)) as test_client:
        yield test_client


def sse_payloads(text: str) -> list[Any]:
    events = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    return [event if event == "[DONE]" else msgspec.json.decode(event) for event in events]


def test_chat_json_with_routing_headers(client: TestClient[Any]) -> None:
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert (message["role"], message["content"]) == ("assistant", "hello there")
    assert body["choices"][0]["index"] == 0
    assert body["usage"]["total_tokens"] > 0
    assert response.headers["x-llmrouter-model-group"] == "m"
    assert response.headers["x-llmrouter-deployment"]
    assert len(response.headers["x-request-id"]) == 32
    assert float(response.headers["x-process-time"]) >= 0


def test_a_model_group_named_outside_latin_1_is_answered_with_its_name_percent_encoded() -> None:
    # Before: a 500 after the answer was made (and billed), and a stream's upstream held open.
    router = Router()
    router.add_deployment("模型", ScriptedProvider("upstream-m", default=Step(echo=True)))
    with TestClient(create_app(router=router)) as client:
        for stream in (False, True):
            response = client.post("/v1/chat/completions", json={**CHAT, "model": "模型", "stream": stream})
            assert response.status_code == 200, response.text
            assert response.headers["x-llmrouter-model-group"] == "%E6%A8%A1%E5%9E%8B"
        assert [d.in_flight for d in router.deployments] == [0]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("group", "header"), [("m", "m"), ("模型", "%E6%A8%A1%E5%9E%8B")])
def test_an_error_after_retries_carries_the_routing_headers(stream: bool, group: str, header: str) -> None:
    # Before: the 502 after three attempts had no X-LLMRouter-Attempts (only answers had).
    router = Router()
    router.add_deployment(group, ScriptedProvider("upstream-m", default=Step(error=UpstreamError("boom"))))
    with TestClient(create_app(router=router)) as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "model": group, "stream": stream})
    assert response.status_code == 502
    assert response.headers["x-llmrouter-attempts"] == "3"
    assert response.headers["x-llmrouter-model-group"] == header
    assert "x-llmrouter-cost" not in response.headers
    assert response.json() == {
        "error": {"message": "boom", "type": "upstream_error", "code": None, "param": None}
    }


def test_paths_without_v1_prefix(client: TestClient[Any]) -> None:
    assert client.post("/chat/completions", json=CHAT).status_code == 200
    assert client.get("/models").json()["data"][0]["id"] == "m"


def test_stream_ends_with_done_and_usage_only_when_asked(client: TestClient[Any]) -> None:
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        == "hello there"
    )
    assert all(c.get("usage") is None for c in chunks)

    asked = client.post(
        "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    )
    last_chunk = sse_payloads(asked.text)[-2]
    assert last_chunk["choices"] == [] and last_chunk["usage"]["completion_tokens"] == 2


def test_error_after_stream_started_is_a_final_event() -> None:
    router, _ = make_router(
        Step(text="one two three", fail_after_chunks=1, error=UpstreamError("engine died"))
    )
    router.groups["m"].retry = msgspec.structs.replace(router.groups["m"].retry, attempts=0)
    with TestClient(create_app(router=router)) as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200
    events = sse_payloads(response.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["message"] == "engine died"
    assert events[0]["choices"][0]["delta"]["content"] == "one"


def test_litestars_loop_sends_the_same_events(monkeypatch: pytest.MonkeyPatch) -> None:
    # Off asyncio (trio), SSEResponse leaves the sending to Litestar's loop over
    # sse_events(); on asyncio it encodes in its own loop. Both must send the same bytes.
    import llmrouter.server.sse as sse

    def bodies() -> list[str]:
        router, _ = make_router(
            Step(text="one two three"),
            Step(text="one two three", fail_after_chunks=1, error=UpstreamError("engine died")),
        )
        router.groups["m"].retry = msgspec.structs.replace(router.groups["m"].retry, attempts=0)
        with TestClient(create_app(router=router)) as client:
            texts = [
                client.post("/v1/chat/completions", json={**CHAT, "stream": True}).text for _ in range(2)
            ]
        # Chunk ids and timestamps differ run to run; the events' shape and content must not.
        return [re.sub(r'"(id|created|request_id)":("[^"]*"|\d+)', r'"\1":0', text) for text in texts]

    on_asyncio = bodies()
    monkeypatch.setattr(sse, "on_asyncio", lambda: False)
    assert bodies() == on_asyncio
    assert on_asyncio[0].endswith("data: [DONE]\n\n") and "engine died" in on_asyncio[1]


def test_request_id_cache_control_and_traceparent_reach_the_context() -> None:
    seen: list[RequestContext] = []

    class Recorder(RouterHooks):
        async def after_request(self, ctx: RequestContext) -> None:
            seen.append(ctx)

    router, _ = make_router()
    router.hooks.append(Recorder())
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with TestClient(create_app(router=router)) as client:
        response = client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={
                "x-request-id": "req-123",
                "cache-control": "no-cache, no-store",
                "traceparent": traceparent,
            },
        )
    assert response.headers["x-request-id"] == "req-123"
    (ctx,) = seen
    assert (ctx.request_id, ctx.no_cache, ctx.no_store, ctx.traceparent) == (
        "req-123",
        True,
        True,
        traceparent,
    )


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b"{not json", None, "not valid JSON"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x', None, "truncated"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d"}]}',
            None,
            "unpaired UTF-16 surrogate",
        ),
        (b"[1, 2]", None, "JSON object"),
        (b'{"model": "m", "messages": []}', "messages", "length >= 1"),
        (
            b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}',
            "messages[0].role",
            "Invalid enum",
        ),
        (b'{"model": "m", "messages": [{"role": "user"}], "temperature": 5}', "temperature", "<= 2"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', None, "model"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}],'
            b' "stream_options": {"include_usage": true}}',
            "stream_options",
            "only allowed when 'stream' is enabled",
        ),
    ],
)
def test_bad_requests_are_400_with_param(
    client: TestClient[Any], body: bytes, param: str | None, fragment: str
) -> None:
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]
    if param is not None:
        assert error["param"] == param


def test_stream_options_need_a_stream_on_both_apis(client: TestClient[Any]) -> None:
    """As OpenAI answers it; ``null`` options, or options with ``stream: true``, pass."""
    completion = {"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}
    response = client.post("/v1/completions", json=completion)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream_options"
    assert client.post("/v1/completions", json={**completion, "stream_options": None}).status_code == 200
    assert client.post("/v1/completions", json={**completion, "stream": True}).status_code == 200


def test_http_level_errors_have_openai_bodies(client: TestClient[Any]) -> None:
    unknown = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    route = client.get("/v1/does-not-exist")
    assert route.status_code == 404 and route.json()["error"]["type"] == "not_found_error"
    assert route.headers["x-request-id"]
    method = client.get("/v1/chat/completions")
    assert method.status_code == 405 and method.json()["error"]["code"] == "method_not_allowed"
    assert method.headers["x-request-id"]


def test_every_answer_has_one_request_id(client: TestClient[Any]) -> None:
    sent = {"x-request-id": "req-7"}
    answers = [
        client.get("/v1/does-not-exist", headers=sent),  # no route: the exception handler
        client.get("/v1/chat/completions", headers=sent),  # 405, also before any route
        client.post("/v1/chat/completions", json={**CHAT, "messages": 3}, headers=sent),  # routed 400
        client.post("/v1/chat/completions", json=CHAT, headers=sent),  # routed 200
    ]
    for answer in answers:
        assert answer.headers.get_list("x-request-id") == ["req-7"], answer.status_code


def test_body_over_the_limit_is_413() -> None:
    router, provider = make_router()
    app = create_app(Config(server=ServerConfig(max_request_bytes=1000)), router=router)
    with TestClient(app) as client:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
        response = client.post("/v1/chat/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert provider.record.calls == 1


def test_compressed_bodies_are_read_and_the_limit_applies_inflated() -> None:
    router, provider = make_router()
    app = create_app(Config(server=ServerConfig(max_request_bytes=1000)), router=router)
    with TestClient(app) as client:
        sent = {"content-type": "application/json", "content-encoding": "gzip"}
        answer = client.post(
            "/v1/chat/completions", content=gzip.compress(msgspec.json.encode(CHAT)), headers=sent
        )
        assert answer.status_code == 200 and answer.json()["object"] == "chat.completion"
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
        bomb = gzip.compress(msgspec.json.encode(big))
        assert len(bomb) < 1000  # under the limit as sent, over it inflated
        too_large = client.post("/v1/chat/completions", content=bomb, headers=sent)
        assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"
        brotli = client.post(
            "/v1/completions", content=b"\x8b\x02\x80", headers={**sent, "content-encoding": "br"}
        )
        assert brotli.status_code == 415 and brotli.headers["accept-encoding"] == "gzip, deflate"
        assert brotli.json()["error"] == {
            "message": "Content-Encoding 'br' is not supported: send the body as it is, or in gzip, deflate",
            "type": "invalid_request_error",
            "code": "unsupported_media_type",
            "param": None,
        }
        broken = client.post("/v1/chat/completions", content=b"\x1f\x8bjunk", headers=sent)
        assert broken.status_code == 400 and "not valid gzip data" in broken.json()["error"]["message"]
    assert provider.record.calls == 1


def test_router_errors_keep_status_and_retry_after() -> None:
    router, _ = make_router(
        Step(error=RateLimitError("slow down", retry_after=7, retryable=False)),
        Step(error=UnprocessableEntityError("cannot do that")),
    )
    with TestClient(create_app(router=router)) as client:
        limited = client.post("/v1/chat/completions", json=CHAT)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "7"
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 422


def test_unexpected_exception_is_a_generic_500(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(RouterHooks):
        async def before_request(self, ctx: RequestContext) -> None:
            raise RuntimeError("secret internal detail")

    router, _ = make_router()
    router.hooks.append(Broken())
    with TestClient(create_app(router=router)) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "internal server error",
        "type": "server_error",
        "code": "internal_error",
        "param": None,
    }
    assert "secret" not in response.text and "Traceback" not in response.text
    assert "secret internal detail" in caplog.text


def test_completions_json_and_stream(client: TestClient[Any]) -> None:
    response = client.post("/v1/completions", json={"model": "m", "prompt": "say this"})
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == "say this"
    streamed = client.post("/v1/completions", json={"model": "m", "prompt": "say this", "stream": True})
    events = sse_payloads(streamed.text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == "say this"


def test_models_list_and_retrieve(client: TestClient[Any]) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["m"]
    assert client.get("/v1/models/m").json()["id"] == "m"
    missing = client.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_health_and_openapi(client: TestClient[Any]) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    schema = client.get("/schema/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    assert "/chat/completions" not in schema["paths"]


def test_the_openapi_document_names_the_request_bodies(client: TestClient[Any]) -> None:
    """The handlers read their bodies raw: without a declared body the document had none,
    and Swagger's "Try it out" sent nothing. Unmodelled fields are top-level on the wire,
    not an ``__extra__`` object."""
    schema = client.get("/schema/openapi.json").json()
    for path, struct in (("/v1/chat/completions", "ChatRequest"), ("/v1/completions", "CompletionRequest")):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["allOf"] == [{"$ref": f"#/components/schemas/{struct}"}] and body["examples"]
        properties = schema["components"]["schemas"][struct]["properties"]
        assert "model" in properties and "__extra__" not in properties
    assert "503" in schema["paths"]["/ready"]["get"]["responses"]
    answer = client.post("/v1/chat/completions", json=CHAT)  # the documenting dependency never runs
    assert answer.status_code == 200


def test_create_app_emits_no_litestar_deprecation_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_app(router=make_router()[0])
    assert [str(w.message) for w in caught if issubclass(w.category, LitestarDeprecationWarning)] == []


def test_cors_from_config() -> None:
    app = create_app(
        Config(server=ServerConfig(cors_origins=["https://app.example"])), router=make_router()[0]
    )
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json=CHAT, headers={"origin": "https://app.example"})
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in response.headers["access-control-expose-headers"]
        other = client.post("/v1/chat/completions", json=CHAT, headers={"origin": "https://evil.example"})
        assert other.status_code == 403 and "access-control-allow-origin" not in other.headers


def test_a_preflight_from_an_origin_not_allowed_is_an_openai_error() -> None:
    app = create_app(
        Config(server=ServerConfig(cors_origins=["https://app.example"])), router=make_router()[0]
    )
    preflight = {"access-control-request-method": "POST"}
    with TestClient(app) as client:
        refused = client.options(
            "/v1/chat/completions", headers={**preflight, "origin": "https://evil.example"}
        )
        allowed = client.options(
            "/v1/chat/completions", headers={**preflight, "origin": "https://app.example"}
        )
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "cors_origin_not_allowed"
    assert "https://evil.example" in refused.json()["error"]["message"]
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"


def test_cors_exposes_every_header_the_docs_list() -> None:
    """docs/service.md: "the headers above are then exposed to browsers"."""
    from pathlib import Path

    from llmrouter.server.app import _EXPOSED_HEADERS

    docs = (Path(__file__).parents[2] / "docs" / "service.md").read_text()
    table = docs.split("Response headers:", 1)[1].split("\n\n", 2)[1]
    documented = {name.lower() for name in re.findall(r"`((?:X|Retry)-[A-Za-z-]+)`", table)}
    assert documented and documented <= set(_EXPOSED_HEADERS)


class KeyExtension(Extension):
    """Needs ``Authorization: Bearer good``; contributes a route, middleware, hooks, readiness."""

    name = "keys"

    def __init__(self, *, ready: bool = True) -> None:
        self.events: list[str] = []
        self.contexts: list[RequestContext] = []
        self.ready = ready
        extension = self

        class Hooks(RouterHooks):
            async def after_request(self, ctx: RequestContext) -> None:
                extension.contexts.append(ctx)

        self.hooks = Hooks()

    def router_hooks(self) -> list[RouterHooks]:
        return [self.hooks]

    def route_handlers(self) -> list[Any]:
        @get("/v1/whoami", sync_to_thread=False)
        def whoami() -> dict[str, str]:
            return {"me": "keys"}

        return [whoami]

    def middleware(self) -> list[Any]:
        def factory(app: Any) -> Any:
            async def tagged(scope: Any, receive: Any, send: Any) -> None:
                async def send_tagged(message: Any) -> None:
                    if message["type"] == "http.response.start":
                        message["headers"] = [*message.get("headers", []), (b"x-ext", b"1")]
                    await send(message)

                await app(scope, receive, send_tagged)

            return tagged

        return [factory]

    async def startup(self) -> None:
        self.events.append("startup")

    async def shutdown(self) -> None:
        self.events.append("shutdown")

    async def authenticate(self, ctx: RequestContext, headers: Mapping[str, str]) -> None:
        if headers.get("authorization") != "Bearer good":
            raise AuthenticationError("invalid API key")
        ctx.api_key_id = "key-1"

    def readiness(self) -> Mapping[str, Any]:
        return {"ready": self.ready, "queue": 0}


def test_extension_is_mounted_and_authenticates() -> None:
    ext = KeyExtension()
    router, provider = make_router()
    with TestClient(create_app(router=router, extensions=[ext])) as client:
        assert ext.events == ["startup"]
        denied = client.post("/v1/chat/completions", json=CHAT)
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        assert client.get("/v1/models").status_code == 401
        allowed = client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer good"})
        assert allowed.status_code == 200 and allowed.headers["x-ext"] == "1"
        assert client.get("/v1/whoami").json() == {"me": "keys"}
        ready = client.get("/ready").json()
        assert ready["ready"] is True and ready["extensions"]["keys"] == {"ready": True, "queue": 0}
    assert ext.events == ["startup", "shutdown"]
    assert [ctx.api_key_id for ctx in ext.contexts] == ["key-1"]
    assert provider.record.calls == 1


def test_a_lifespan_run_twice_calls_each_hook_once_and_records_every_request(tmp_path: Path) -> None:
    # Two `with TestClient(app)` blocks over one app: the second start replaces the
    # extensions' hooks (accounting makes new ones at each start) and its ledger writes.
    config = parse_config(
        {
            "accounting": {
                "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'acct.db'}"},
                "ledger": {"journal_dir": str(tmp_path / "journal")},
            }
        },
        env={},
    )
    extensions = default_extensions(config)
    router, provider = make_router()
    app = create_app(config, router=router, extensions=extensions)
    for _ in range(2):
        with TestClient(app) as client:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert router.hooks == [hook for ext in extensions for hook in ext.router_hooks()]
    assert provider.record.calls == 2
    assert list((tmp_path / "journal").iterdir()) == []  # every row written at shutdown
    with closing(sqlite3.connect(tmp_path / "acct.db")) as db:
        assert db.execute("SELECT count(*) FROM llmr_ledger").fetchone() == (2,)


def test_ready_is_503_when_an_extension_is_not_ready() -> None:
    with TestClient(create_app(router=make_router()[0], extensions=[KeyExtension(ready=False)])) as client:
        response = client.get("/ready")
    assert response.status_code == 503 and response.json()["ready"] is False


def test_cache_layer_from_extension_is_installed() -> None:
    class Layer:
        def __init__(self) -> None:
            self.groups: list[str] = []

        def configure_group(self, name: str, settings: Any) -> None:
            self.groups.append(name)

        async def chat(self, ctx: RequestContext, request: Any, call: Any) -> Any:
            ctx.cache_status = "miss"
            return await call()

        def stream(self, ctx: RequestContext, request: Any, call: Any) -> Any:
            ctx.cache_status = "bypass"
            return call()

    layer = Layer()

    class CacheExt(Extension):
        name = "cache"

        def cache_layer(self) -> Any:
            return layer

    from llmrouter.config import GroupCache, ModelGroup

    router, _ = make_router()
    # A group's own cache settings go to the layer (one without any leaves the layer's).
    router.groups["m"].config = ModelGroup(name="m", deployments=[], cache=GroupCache(ttl=5))
    with TestClient(create_app(router=router, extensions=[CacheExt()])) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.headers["x-llmrouter-cache"] == "miss"
    assert router.cache is layer and layer.groups == ["m"]
