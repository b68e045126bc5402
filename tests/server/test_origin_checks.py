"""Web pages cannot use the service unless allowed: a cross-site request (even a
``text/plain`` POST, which needs no CORS preflight) and a page after DNS rebinding (its
own name resolving to 127.0.0.1, its requests same-origin) are refused 403, while SDKs
and curl, which send no ``Origin``, and the service's own pages pass.

The attacks run against uvicorn on loopback, where the scope's ``server`` is the address
the connection reached; the policy's details through the test client, given that address
as its base URL.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient

from llmrouter.config import Config, ServerConfig
from llmrouter.router import Router
from llmrouter.server import create_app
from llmrouter.testing.scripted import ScriptedProvider, Step
from llmrouter.testing.serve import serve_app

CHAT = '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
TEXT_PLAIN = {"content-type": "text/plain;charset=UTF-8"}  # what a page may POST cross-site unasked


def make_app(cors_origins: list[str] | None = None) -> Any:
    router = Router()
    router.add_deployment("m", ScriptedProvider(default=Step(text="hello")))
    return create_app(Config(server=ServerConfig(cors_origins=cors_origins or [])), router=router)


@pytest.fixture(scope="module")
def service() -> Iterator[httpx.Client]:
    with serve_app(make_app()) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


def post_chat(client: httpx.Client, **headers: str) -> httpx.Response:
    return client.post("/v1/chat/completions", content=CHAT, headers={**TEXT_PLAIN, **headers})


def test_a_cross_site_post_is_refused(service: httpx.Client) -> None:
    response = post_chat(service, origin="http://evil.example")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "cors_origin_not_allowed"
    assert response.json()["error"]["type"] == "permission_error"


def test_a_page_after_dns_rebinding_is_refused(service: httpx.Client) -> None:
    port = service.base_url.port
    page = {"host": f"evil.example:{port}"}
    posted = post_chat(service, origin=f"http://evil.example:{port}", **page)
    # A same-origin GET from a plain-http page carries no Origin and no Sec-Fetch-Site
    # (Chromium sends those to trustworthy origins only), and in Firefox the page may set
    # its own User-Agent: it was let through.
    read = service.get("/v1/admin/keys", headers={**page, "user-agent": "curl/8.5.0"})
    for response in (posted, read):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "host_not_allowed"


def test_clients_without_origin_and_the_services_own_pages_pass(service: httpx.Client) -> None:
    port = service.base_url.port
    assert post_chat(service).status_code == 200  # an SDK, curl
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"0.0.0.0:{port}", "app.localhost"):
        own = {"origin": f"http://{host}", "host": host, "sec-fetch-site": "same-origin"}
        assert post_chat(service, **own).status_code == 200, host


def loopback_client(app: Any) -> TestClient[Any]:
    """A test client whose requests reach ``app`` as if over loopback."""
    return TestClient(app, base_url="http://127.0.0.1:8000")


def test_origins_allowed_by_the_config_pass_and_their_hosts_too() -> None:
    app = make_app(["https://app.example", "https://llm.example.com"])
    with loopback_client(app) as client:
        preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
        assert client.options("/v1/chat/completions", headers=preflight).status_code == 204
        assert post_chat(client, origin="https://app.example").status_code == 200
        # A reverse proxy on this machine that keeps the Host: the name is an allowed origin's.
        proxied = {"host": "llm.example.com", "sec-fetch-site": "same-origin"}
        assert client.get("/v1/models", headers=proxied).status_code == 200
        assert post_chat(client, origin="https://llm.example.com", **proxied).status_code == 200
        refused = client.get("/v1/models", headers={"host": "other.example"})
        assert refused.status_code == 403


def test_any_origin_allowed_lets_every_page_in() -> None:
    with loopback_client(make_app(["*"])) as client:
        assert post_chat(client, origin="http://evil.example", host="evil.example").status_code == 200


def test_no_host_check_off_loopback() -> None:
    # The same page on a service reached on another address (a 0.0.0.0 bind over the LAN).
    with TestClient(make_app(), base_url="http://192.0.2.7:8000") as client:
        page = {"origin": "http://evil.example", "host": "evil.example", "sec-fetch-site": "same-origin"}
        assert post_chat(client, **page).status_code == 200
        assert post_chat(client, **{**page, "origin": "http://other.example"}).status_code == 403


def test_refusals_are_logged_at_most_a_line_a_while_and_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every refusal logged a line (any page can send them by the hundred), the path as it
    # came: a key's secret in an admin path, a forged newline.
    secret = "sk-llmr-abcd1234-" + "S" * 43
    with loopback_client(make_app()) as client, caplog.at_level(logging.WARNING, "llmrouter.server"):
        for _ in range(50):
            response = client.get(f"/v1/admin/keys/{secret}%0AFORGED", headers={"host": "evil.example"})
            assert response.status_code == 403
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(lines) == 1
    assert "S" * 10 not in lines[0] and "sk-llmr-abcd1234-..." in lines[0] and "\n" not in lines[0]


def test_the_machines_own_names_pass(service: httpx.Client) -> None:
    # /etc/hosts maps the host name to loopback: programs here used it (and
    # `serve --host <name>` printed it) and were refused; no rebinding page sends it.
    port = service.base_url.port
    assert service.get("/v1/models", headers={"host": f"{socket.gethostname()}:{port}"}).status_code == 200
    with TestClient(
        create_app(Config(server=ServerConfig(host="llm-box")), router=Router()),
        base_url="http://127.0.0.1:8000",
    ) as client:
        assert client.get("/health", headers={"host": "llm-box:8000"}).status_code == 200
        assert client.get("/health", headers={"host": "other-box:8000"}).status_code == 403
