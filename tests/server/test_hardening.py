"""The service boundary under hostile and odd input: every refusal is an OpenAI-style
4xx body, never a 500, a stack trace or a header the client smuggled in.

One service for the module (accounting on a temporary SQLite, the memory cache, metrics)
over the remote provider and the fake upstream; an admin key exists, so auth is on.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmrouter.config import parse_config
from llmrouter.server import create_app
from llmrouter.server.app import default_extensions
from llmrouter.testing.serve import serve_app
from llmrouter.testing.upstream import FakeUpstream

CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
JSON = {"content-type": "application/json"}


def _config(base_url: str, tmp: Path) -> Any:
    return parse_config(
        {
            "models": [
                {
                    "name": "mock-gpt",
                    "deployments": [
                        {
                            "provider": "remote",
                            "model": "mock-gpt",
                            "base_url": base_url,
                            "price": {"input": 0.15, "output": 0.6},
                        }
                    ],
                }
            ],
            "router": {"retry": {"attempts": 0}},
            "accounting": {
                "database": {"url": f"sqlite+aiosqlite:///{tmp / 'acct.db'}"},
                "ledger": {"journal_dir": str(tmp / "journal"), "flush_interval": 0.02},
            },
            "cache": {"backend": "memory"},
            "telemetry": {"metrics": True, "json_logs": False, "access_log": False},
        },
        env={},
    )


@pytest.fixture(scope="module")
def client(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    config = _config(upstream.base_url, tmp_path_factory.mktemp("hardening"))
    with serve_app(create_app(config, extensions=default_extensions(config))) as url:
        with httpx.Client(base_url=url, timeout=20) as plain:
            created = plain.post("/v1/admin/keys", json={"name": "root", "scopes": ["admin"]})
            assert created.status_code == 201, created.text
            secret = created.json()["secret"]
        with httpx.Client(base_url=url, timeout=20, headers={"Authorization": f"Bearer {secret}"}) as authed:
            yield authed


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] and "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "mock-gpt", "messages": [{"role": "user", "content": "\xff\xfe"}], "prompt": "\xff"}',
        b'{"model": "\xc3\x28", "messages": [], "prompt": ""}',
    ],
    ids=["content", "model"],
)
def test_a_body_that_is_not_utf8_is_400(client: httpx.Client, path: str, body: bytes) -> None:
    error = assert_openai_error(client.post(path, content=body, headers=JSON), 400)
    assert "UTF-8" in error["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    "nested",
    ["[" * 2000 + "]" * 2000, '{"a":' * 5000 + "1" + "}" * 5000, "[" * 100_000],
    ids=["arrays", "objects", "unclosed"],
)
def test_deeply_nested_json_is_400(client: httpx.Client, path: str, nested: str) -> None:
    body = (
        '{"model": "mock-gpt", "prompt": "a", "messages": [{"role": "user", "content": "a"}], "x": '
        + nested
        + "}"
    )
    error = assert_openai_error(client.post(path, content=body.encode(), headers=JSON), 400)
    assert "nested" in error["message"] or "JSON" in error["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_json_nested_just_under_the_decoders_limit_is_never_an_upstream_failure(
    client: httpx.Client, path: str, stream: bool
) -> None:
    # The decoder takes nesting the provider's encoder, deeper in the stack, cannot: it
    # was a 502 counted against the deployment, so a few such requests from one key put
    # the model in cooldown for everyone.
    statuses = set()
    for depth in range(900, 1001):
        body = {**CHAT, "prompt": "a", "stream": stream}
        text = json.dumps(body)[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
        response = client.post(path, content=text.encode(), headers=JSON)
        statuses.add(response.status_code)
        if response.status_code != 200:
            assert_openai_error(response, 400)
    assert 400 in statuses  # the sweep reaches the limit
    assert client.post(path, json={**CHAT, "prompt": "a"}).status_code == 200


def test_tool_parameters_nested_just_under_the_decoders_limit_are_400(client: httpx.Client) -> None:
    # A priced model counts the tools' JSON for the budget bound: that encoder raised
    # RecursionError, a 500.
    statuses = set()
    for depth in range(900, 1001):
        nested = '{"type": "object", "x": ' + "[" * depth + "]" * depth + "}"
        tool = '{"type": "function", "function": {"name": "f", "parameters": ' + nested + "}}"
        text = json.dumps(CHAT)[:-1] + ', "tools": [' + tool + "]}"
        response = client.post("/v1/chat/completions", content=text.encode(), headers=JSON)
        statuses.add(response.status_code)
        if response.status_code != 200:
            assert_openai_error(response, 400)
    assert 400 in statuses


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "max_tokens", 10**400),  # overflowed the cost bound: a 500
        ("/v1/chat/completions", "max_tokens", 10**30),
        ("/v1/chat/completions", "max_tokens", 2**31),
        ("/v1/chat/completions", "max_completion_tokens", 2**40),
        ("/v1/chat/completions", "seed", 2**64),
        ("/v1/chat/completions", "seed", -(2**63) - 1),
        ("/v1/completions", "max_tokens", 10**400),
        ("/v1/completions", "best_of", 10**30),
        ("/v1/completions", "seed", 10**30),
    ],
    ids=lambda v: f"{str(v)[:12]}" if isinstance(v, int) else str(v),
)
def test_integers_out_of_range_are_400(client: httpx.Client, path: str, field: str, value: int) -> None:
    body = f'{{"model": "mock-gpt", "prompt": "a", "messages": [{{"role": "user", "content": "a"}}], "{field}": {value}}}'
    assert_openai_error(client.post(path, content=body.encode(), headers=JSON), 400, param=field)


def test_a_tool_message_without_its_call_id_is_400(client: httpx.Client, fake: FakeUpstream) -> None:
    calls = len(fake.requests)
    messages = [{"role": "user", "content": "a"}, {"role": "tool", "content": "42"}]
    error = assert_openai_error(
        client.post("/v1/chat/completions", json={**CHAT, "messages": messages}),
        400,
        param="messages[1].tool_call_id",
    )
    assert error["code"] == "missing_required_parameter"
    assert len(fake.requests) == calls  # refused before any upstream call


def test_a_client_gone_before_its_body_ended_is_not_a_server_error(client: httpx.Client) -> None:
    url = httpx.URL(str(client.base_url))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.host}\r\n"
        f"Authorization: {client.headers['authorization']}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    for _ in range(3):
        with socket.create_connection((url.host, url.port)) as raw:
            raw.sendall(head.encode() + b'{"model": "mock-gpt", ')
    time.sleep(0.3)
    metrics = client.get("/metrics").text
    assert 'http_response_status_code="499"' in metrics
    assert 'http_response_status_code="500"' not in metrics  # it was a 500


def test_largest_integers_are_served(client: httpx.Client, fake: FakeUpstream) -> None:
    body = {**CHAT, "max_tokens": 2**31 - 1, "seed": 2**63 - 1}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert fake.last_request.json["max_tokens"] == 2**31 - 1


@pytest.mark.parametrize(
    "sent",
    [b"caf\xe9", b"a" * 10_240, b"id with space", b"tab\there", b"\xc3\xa9t\xc3\xa9"],
    ids=["latin1", "10KB", "space", "tab", "utf8"],
)
def test_an_odd_request_id_is_replaced_not_echoed(
    client: httpx.Client, fake: FakeUpstream, sent: bytes
) -> None:
    # 'café' used to be echoed and forwarded upstream, where httpx refused the header: a 502.
    response = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": sent})
    assert response.status_code == 200, response.text
    echoed = response.headers["x-request-id"]
    assert echoed.encode("latin-1") != sent and echoed.isascii() and echoed.isalnum()
    assert fake.last_request.headers["x-request-id"] == echoed


def test_a_sane_request_id_is_kept(client: httpx.Client, fake: FakeUpstream) -> None:
    sent = "req-2026.11_abc:DEF/1+2=3"
    response = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": sent})
    assert response.status_code == 200 and response.headers["x-request-id"] == sent
    assert fake.last_request.headers["x-request-id"] == sent


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "k", "rpm": 10**30}, "rpm"),  # was a 500 (SQLite integer overflow)
        ({"name": "k", "rpm": 2**63}, "rpm"),
        ({"name": "k", "rpm": -1}, "rpm"),
        ({"name": "k", "concurrency": 0}, "concurrency"),
        ({"name": "k", "budget": 1e300}, "budget"),  # was created, then every use a 500
        ({"name": "k", "expires_in_days": 1e308}, "expires_in_days"),  # the field sent
        ({"name": "k", "expires_in_days": 0}, "expires_in_days"),  # was created already expired
        ({"name": "k", "expires_in_days": -3}, "expires_in_days"),
        ({"name": "k", "expires_in_days": 3, "expires_at": 4102444800}, "expires_in_days"),
        ({"name": "k", "expires_at": 946684800}, "expires_at"),  # 2000-01-01
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "a\u0000b\r\n"}, "name"),
        ({"name": "k", "note": "a\u0000b"}, "note"),  # a 500 on PostgreSQL
        ({"name": "k", "rpm": "ten"}, "rpm"),  # msgspec's own check names the field too
        ({"name": "k", "scopes": ["root"]}, "scopes[0]"),
    ],
)
def test_admin_key_fields_out_of_range_are_400(
    client: httpx.Client, body: dict[str, Any], param: str
) -> None:
    assert_openai_error(client.post("/v1/admin/keys", json=body), 400, param=param)


def test_admin_key_body_not_utf8_is_400(client: httpx.Client) -> None:
    assert_openai_error(client.post("/v1/admin/keys", content=b'{"name": "\xff"}', headers=JSON), 400)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("POST", "/v1/chat/completions", {"content": b"", "headers": JSON}, 400),
        ("POST", "/v1/chat/completions", {"content": b"[]", "headers": JSON}, 400),
        ("POST", "/v1/chat/completions", {"content": b'{"temperature": NaN}', "headers": JSON}, 400),
        ("POST", "/v1/chat/completions", {"content": b'{"temperature": 1e999}', "headers": JSON}, 400),
        ("POST", "/v1/chat/completions", {"json": {**CHAT, "n": 129}}, 400),
        ("POST", "/v1/chat/completions", {"json": {**CHAT, "max_tokens": -1}}, 400),
        (
            "POST",
            "/v1/chat/completions",
            {"json": {**CHAT, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]}},
            400,
        ),
        ("POST", "/v1/chat/completions", {"json": {**CHAT, "model": "m" * 100_000}}, 404),
        ("POST", "/v1/chat/completions", {"json": {**CHAT, "model": "a\r\nX-Evil: 1"}}, 404),
        ("GET", "/v1/chat/completions", {}, 405),
        ("GET", "/v1/models/" + "a" * 5000, {}, 404),
        ("GET", "/v1/usage?since=garbage", {}, 400),
        ("GET", "/v1/admin/usage?since=24h&until=7d", {}, 400),
        ("GET", "/v1/admin/usage?by=model;drop", {}, 400),
        ("GET", "/v1/usage?until=9999-12-31", {}, 400),
        ("GET", "/v1/admin/usage?since=" + "9" * 400 + "d", {}, 400),
        ("DELETE", "/v1/admin/keys/" + "x" * 5000, {}, 404),
    ],
)
def test_odd_requests_get_their_4xx(
    client: httpx.Client, method: str, path: str, kwargs: dict[str, Any], status: int
) -> None:
    response = client.request(method, path, **kwargs)
    assert_openai_error(response, status)
    assert "x-evil" not in response.headers


@pytest.mark.parametrize("path", ["/v1/usage?by=day,day", "/v1/admin/usage?by=model,%20model,day"])
def test_a_dimension_named_twice_is_grouped_by_once(client: httpx.Client, path: str) -> None:
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    response = client.get(path)
    assert response.status_code == 200, response.text


def test_user_keys_cannot_reach_admin_endpoints(client: httpx.Client) -> None:
    created = client.post("/v1/admin/keys", json={"name": "plain-user"})
    user = {"Authorization": f"Bearer {created.json()['secret']}"}
    for method, path in [
        ("GET", "/v1/admin/keys"),
        ("POST", "/v1/admin/keys"),
        ("DELETE", "/v1/admin/keys/root"),
        ("GET", "/v1/admin/usage"),
        ("GET", "/v1/admin/cache"),
        ("DELETE", "/v1/admin/cache"),
    ]:
        kwargs: dict[str, Any] = {"json": {"name": "evil", "scopes": ["admin"]}} if method == "POST" else {}
        response = httpx.request(method, f"{client.base_url}{path}", headers=user, **kwargs)
        assert_openai_error(response, 403)


def test_head_is_answered_by_every_get_route_without_a_body():
    from litestar.testing import TestClient

    from llmrouter.config import Config
    from llmrouter.server import create_app

    with TestClient(create_app(Config(discover=False))) as client:
        for path in ("/health", "/ready", "/v1/models"):
            got, head = client.get(path), client.head(path)
            assert (head.status_code, head.content) == (got.status_code, b""), path
            assert head.headers["content-type"] == got.headers["content-type"], path
            assert head.headers["content-length"] == str(len(got.content)), path
            assert head.headers["x-request-id"] != got.headers["x-request-id"]
        missing = client.head("/v1/models/nope")
        assert (missing.status_code, missing.content) == (404, b"")
        # Routes without a GET stay 405 (with the methods they take), also without a body.
        not_allowed = client.head("/v1/chat/completions")
        assert (not_allowed.status_code, not_allowed.content) == (405, b"")
        assert "POST" in not_allowed.headers["allow"]


def test_allow_lists_head_wherever_get_is() -> None:
    # HEAD is answered as GET in front of Litestar's router, which does not list it.
    from litestar.testing import TestClient

    from llmrouter.config import Config
    from llmrouter.server import create_app

    with TestClient(create_app(Config(discover=False))) as client:
        for method in ("PUT", "OPTIONS"):
            answer = client.request(method, "/health")
            assert answer.headers["allow"] == "GET, HEAD, OPTIONS", method
        assert client.put("/health").json()["error"]["code"] == "method_not_allowed"
        # A route without GET answers no HEAD either.
        assert client.put("/v1/chat/completions").headers["allow"] == "POST, OPTIONS"


def test_header_dict_takes_the_first_of_repeated_names() -> None:
    # What the service authenticates with: the first of repeated names wins, as it did
    # with Litestar's Headers, and values are read as Latin-1.
    from llmrouter.server.state import header_dict

    raw = [
        (b"authorization", b"Bearer first"),
        (b"x-api-key", b"k\xe9"),
        (b"authorization", b"Bearer second"),
    ]
    assert header_dict(raw) == {"authorization": "Bearer first", "x-api-key": "k\u00e9"}
