"""The dashboard's routes over HTTP (no browser needed: these run in the default suite).

The page and its two assets are served with a same-origin Content-Security-Policy; any
other name under ``/dashboard/`` is a 404 with the OpenAI error body, and the files
reference nothing outside this origin (the page must work without internet access).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib import resources

import pytest
from litestar.testing import TestClient

from llmrouter.config import Config
from llmrouter.router import Router
from llmrouter.server import create_app
from llmrouter.server.dashboard import CONTENT_SECURITY_POLICY

STATIC = resources.files("llmrouter.server").joinpath("static")


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Config(), router=Router())) as test_client:
        yield test_client


def test_page_and_assets_are_served_with_a_csp(client: TestClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<title>llmrouter usage</title>" in page.text
    # Assets are relative to the page (proxy prefixes work), so the page has one URL.
    slash = client.get("/dashboard/", follow_redirects=False)
    assert slash.status_code == 308 and slash.headers["location"] == "../dashboard"
    for asset, media_type in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        response = client.get(f"/dashboard/{asset}")
        assert response.status_code == 200, asset
        assert response.headers["content-type"].startswith(media_type)
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.content == STATIC.joinpath(asset).read_bytes()
    policy = dict(part.split(" ", 1) for part in CONTENT_SECURITY_POLICY.split("; "))
    assert policy["script-src"] == "'self'" and policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'" and policy["default-src"] == "'none'"


@pytest.mark.parametrize(
    "path", ["/dashboard/secret.txt", "/dashboard/..%2Fapp.py", "/dashboard/dashboard.html.bak"]
)
def test_other_names_are_not_found(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_the_page_needs_nothing_from_other_origins() -> None:
    html = STATIC.joinpath("dashboard.html").read_text()
    script = STATIC.joinpath("dashboard.js").read_text()
    css = STATIC.joinpath("dashboard.css").read_text()
    # The CSP forbids inline script and style: all of it lives in the two files.
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert "<style" not in html and " style=" not in html
    assert set(re.findall(r'(?:src|href)="([^"#]+)"', html)) == {
        "dashboard/dashboard.css",
        "dashboard/dashboard.js",
    }
    for text in (html, script, css):
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text)
    # Data reaches the page through textContent only.
    assert not re.search(r"\.(?:innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write|\beval\(", script)


def test_the_schema_does_not_list_the_page(client: TestClient) -> None:
    paths = client.get("/schema/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/dashboard")]
