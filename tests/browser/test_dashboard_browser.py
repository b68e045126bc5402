"""The usage dashboard in real headless Chromium, against the real service.

The service runs in-process (uvicorn in a thread) with accounting on a temporary SQLite
database, the memory cache, and the remote provider in front of the fake OpenAI
upstream. Keys are created through the library, traffic goes through the official
``openai`` client, and what the page shows is compared with the ledger table read
directly with ``sqlite3``.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmrouter.accounting import extension_from_config as accounting_extension
from llmrouter.config import Config, parse_config
from llmrouter.server import create_app
from llmrouter.testing.serve import serve_app
from llmrouter.testing.upstream import FakeUpstream

pytestmark = [pytest.mark.browser, pytest.mark.anyio]

openai = pytest.importorskip("openai")


@dataclass
class Service:
    url: str
    db: Path
    secrets: dict[str, str]
    """Key name -> secret."""
    key_ids: dict[str, str]


def service_config(upstream: FakeUpstream, tmp_path: Path, *, accounting: bool = True) -> Config:
    def deployment(price_in: float, price_out: float) -> dict[str, Any]:
        return {
            "provider": "remote",
            "model": "fake-model",
            "base_url": upstream.base_url,
            "price": {"input": price_in, "output": price_out},
        }

    return parse_config(
        {
            "models": [
                {"name": "chat-model", "deployments": [deployment(1.0, 2.0)]},
                {"name": "summary-model", "deployments": [deployment(5.0, 15.0)]},
            ],
            "discover": False,
            "accounting": {
                "enabled": accounting,
                "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"},
                "ledger": {"journal_dir": str(tmp_path / "journal"), "flush_interval": 0.02},
            },
            "cache": {"backend": "memory"},
        },
        env={},
    )


async def create_keys(config: Config, specs: dict[str, list[str]]) -> tuple[dict[str, str], dict[str, str]]:
    """Keys made through the library, before the service starts (auth turns on)."""
    from llmrouter.accounting import Accounting

    secrets: dict[str, str] = {}
    ids: dict[str, str] = {}
    async with Accounting.from_config(config) as acct:
        for name, scopes in specs.items():
            key, secret = await acct.keys.create(name, scopes=scopes)
            secrets[name], ids[name] = secret, key.id
    return secrets, ids


def ledger_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM llmr_ledger").fetchone()[0])


def ledger_totals(db: Path, key_id: str | None = None) -> dict[str, Any]:
    """The ledger's own sums (all rows, or one key's)."""
    where, args = ("WHERE api_key_id = ?", (key_id,)) if key_id else ("", ())
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),"
            " coalesce(sum(cost), 0), coalesce(sum(cache_status = 'hit'), 0)"
            f" FROM llmr_ledger {where}",
            args,
        ).fetchone()
    requests, prompt, completion, cost, hits = row
    return {"requests": requests, "tokens": prompt + completion, "cost": cost, "hits": hits}


def send_traffic(
    url: str, secret: str | None, model: str, prompts: list[str], *, stream: bool = False
) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=secret or "sk-no-key", max_retries=0, timeout=30)
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        if stream:
            chunks = client.chat.completions.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True}
            )
            assert [c for c in chunks if c.usage is not None]
        else:
            reply = client.chat.completions.create(model=model, messages=messages, temperature=0)
            assert reply.choices[0].message.content


def wait_for_ledger(db: Path, count: int) -> None:
    deadline = time.monotonic() + 15
    while not (db.exists() and ledger_rows(db) >= count):
        assert time.monotonic() < deadline, f"the ledger has {ledger_rows(db)} rows, expected {count}"
        time.sleep(0.05)


def behind_prefix(app: Any, prefix: str) -> Any:
    """The app as a reverse proxy that strips ``prefix`` from the path would present it."""

    async def proxied(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            assert scope["path"].startswith(prefix), scope["path"]
            path = scope["path"][len(prefix) :]
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await app(scope, receive, send)

    return proxied


@asynccontextmanager
async def running_service(
    tmp_path: Path, *, keys: dict[str, list[str]], accounting: bool = True, prefix: str = ""
) -> AsyncIterator[Service]:
    with FakeUpstream(models=["fake-model"], reply="Noted: {last_user}", chunks=3) as upstream:
        config = service_config(upstream, tmp_path, accounting=accounting)
        secrets, ids = await create_keys(config, keys) if keys else ({}, {})
        extensions = []
        if accounting and (ext := accounting_extension(config)) is not None:
            extensions.append(ext)
        from llmrouter.cache import extension_from_config as cache_extension

        if (cache := cache_extension(config)) is not None:
            extensions.append(cache)
        app = create_app(config, extensions=extensions)
        with serve_app(behind_prefix(app, prefix) if prefix else app) as url:
            yield Service(url=url + prefix, db=tmp_path / "ledger.db", secrets=secrets, key_ids=ids)


def run_in_thread(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Blocking set-up (asyncio.run, the sync openai client) off the test's event loop."""
    return asyncio.to_thread(func, *args, **kwargs)


async def totals_shown(page: Any) -> dict[str, Any]:
    return await page.eval("""(() => {
        const v = id => document.getElementById(id);
        return {requests: Number(v('total-requests').dataset.value),
                tokens: Number(v('total-tokens').dataset.value),
                cost: Number(v('total-cost').dataset.value),
                ratio: Number(v('total-cache').dataset.value),
                requests_text: v('total-requests').textContent,
                cost_text: v('total-cost').textContent,
                cache_text: v('total-cache').textContent};
    })()""")


def assert_totals(shown: dict[str, Any], ledger: dict[str, Any]) -> None:
    assert shown["requests"] == ledger["requests"] > 0
    assert shown["requests_text"] == f"{ledger['requests']:,}"
    assert shown["tokens"] == ledger["tokens"] > 0
    assert shown["cost"] == pytest.approx(ledger["cost"], rel=1e-9, abs=1e-12)
    assert shown["cost"] > 0 and shown["cost_text"].startswith("$")
    assert shown["ratio"] == pytest.approx(ledger["hits"] / ledger["requests"])


async def table(page: Any) -> dict[str, Any]:
    return await page.eval("""(() => {
        const t = document.getElementById('table');
        const cells = tr => Array.from(tr.cells).map(c => c.textContent.trim());
        return {head: cells(t.tHead.rows[0]), rows: Array.from(t.tBodies[0].rows).map(cells),
                foot: cells(t.tFoot.rows[0])};
    })()""")


async def report_ready(page: Any) -> None:
    await page.wait_for(
        "!document.getElementById('report').hidden"
        " && document.getElementById('report').getAttribute('aria-busy') === 'false'"
        " && document.getElementById('total-requests').dataset.value !== undefined"
    )


async def sign_in(page: Any, secret: str) -> None:
    await page.type("#key-input", secret)
    await page.click("#login-form button[type=submit]")


async def test_dashboard_admin_and_user_views(browser: Any, tmp_path: Path) -> None:
    keys = {"finance-admin": ["admin"], "team-app": ["user"]}
    async with running_service(tmp_path, keys=keys) as service:
        user, admin = service.secrets["team-app"], service.secrets["finance-admin"]
        await run_in_thread(send_traffic, service.url, user, "chat-model", ["alpha", "beta", "alpha"])
        await run_in_thread(send_traffic, service.url, user, "chat-model", ["streamed"], stream=True)
        await run_in_thread(send_traffic, service.url, admin, "summary-model", ["quarterly", "numbers"])
        await run_in_thread(wait_for_ledger, service.db, 6)
        everyone = ledger_totals(service.db)
        own = ledger_totals(service.db, service.key_ids["team-app"])
        assert own["requests"] == 4 and everyone["requests"] == 6 and everyone["hits"] >= 1

        page = await browser.new_page()
        await page.goto(f"{service.url}/dashboard")
        # Auth is on (keys exist): the page asks for a key.
        await page.wait_for("!document.getElementById('login').hidden")
        assert "needs an API key" in await page.text("#alert")

        # A wrong key: a clear 401 message, and the page asks again.
        await sign_in(page, "sk-llmr-abcdefgh-not-a-real-key")
        await page.wait_for("document.getElementById('alert').textContent.includes('refused this API key')")
        assert await page.eval(
            "!document.getElementById('login').hidden && document.getElementById('report').hidden"
        )
        assert await page.eval("sessionStorage.getItem('llmrouter.dashboard.key')") is None
        await page.screenshot(tmp_path / "dashboard-401.png")

        # The user key: only its own usage, by day and model; no key dimension.
        await sign_in(page, user)
        await report_ready(page)
        assert "team-app" in await page.text("#who")
        assert_totals(await totals_shown(page), own)
        shown = await table(page)
        assert shown["head"][:2] == ["Day", "Model"] and "Key" not in shown["head"]
        assert {row[1] for row in shown["rows"]} == {"chat-model"}
        body_text = await page.text("body")
        assert "finance-admin" not in body_text and "summary-model" not in body_text
        assert not await page.eval("document.getElementById('dim-key')")
        assert await page.eval("sessionStorage.getItem('llmrouter.dashboard.key')") == user

        # The key survives a reload (same tab); regrouping by provider and status.
        await page.reload()
        await report_ready(page)
        await page.click("#dim-day")
        await page.click("#dim-status")
        await page.click("#apply")
        await page.wait_for("document.querySelector('#table thead').textContent.includes('Status')")
        shown = await table(page)
        assert shown["head"][:2] == ["Model", "Status"]
        assert shown["rows"] == [shown["rows"][0]] and shown["rows"][0][:3] == ["chat-model", "ok", "4"]

        # Forget the key; the admin key sees everyone's usage, grouped by key and model.
        await page.click("#signout")
        await page.wait_for("!document.getElementById('login').hidden")
        await sign_in(page, admin)
        await report_ready(page)
        assert "finance-admin" in await page.text("#who") and "admin" in await page.text("#who")
        assert_totals(await totals_shown(page), everyone)
        shown = await table(page)
        assert shown["head"][:2] == ["Key", "Model"]
        assert {(row[0], row[1]) for row in shown["rows"]} == {
            ("finance-admin", "summary-model"),
            ("team-app", "chat-model"),
        }
        assert shown["foot"][0] == "Total" and shown["foot"][2] == "6"

        # The chart: one bar per day, whose costs add up to the total.
        bars = await page.eval(
            "Array.from(document.querySelectorAll('#chart rect.bar'))"
            ".map(b => [b.dataset.day, Number(b.dataset.cost)])"
        )
        today = time.strftime("%Y-%m-%d", time.gmtime())
        assert len(bars) == 30 and bars[-1][0] == today
        assert sum(cost for _, cost in bars) == pytest.approx(everyone["cost"])
        assert await page.eval("document.querySelector('#chart svg').getAttribute('role')") == "img"

        await page.screenshot(tmp_path / "dashboard-admin.png")

        # CSV download of the current table.
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        await browser.send(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        await page.wait_for("!document.getElementById('csv').disabled")
        await page.click("#csv")
        # The page says it made the file: a click that missed fails here, not as a lost download.
        await page.wait_for("document.getElementById('status').textContent.includes('downloaded')")
        csv_file = await wait_for_download(downloads)
        rows = list(csv.DictReader(io.StringIO(csv_file.read_text())))
        assert sorted(r["key_name"] for r in rows) == ["finance-admin", "team-app"]
        assert sum(int(r["requests"]) for r in rows) == everyone["requests"]
        assert sum(float(r["cost"]) for r in rows) == pytest.approx(everyone["cost"])
        assert set(rows[0]) >= {"key", "key_name", "model", "requests", "prompt_tokens", "cost", "cache_hits"}

        # A range with no usage, then a preset back to the recent days.
        await page.eval(
            "document.getElementById('since').value = '2001-01-01';"
            "document.getElementById('until').value = '2001-01-31'"
        )
        await page.click("#apply")
        await page.wait_for("document.getElementById('total-requests').dataset.value === '0'")
        assert "No usage in this range." in await page.text("#chart")
        await page.click("[data-preset='7']")
        await page.wait_for(
            f"document.getElementById('total-requests').dataset.value === '{everyone['requests']}'"
        )

        # Narrow screens: nothing wider than the viewport (the table scrolls in its own box).
        await page.set_viewport(390, 844)
        await page.reload()
        await report_ready(page)
        overflow = await page.eval("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than a 390px screen"
        await page.screenshot(tmp_path / "dashboard-narrow.png")

        assert await page.eval("window.__cspViolations") == []
        assert page.problems() == []


async def wait_for_download(folder: Path, within: float = 15.0) -> Path:
    """The first finished ``.csv`` in ``folder`` (Chromium renames it from ``.crdownload``)."""
    deadline = time.monotonic() + within
    while True:
        names = await asyncio.to_thread(os.listdir, folder)
        done = [folder / name for name in names if name.endswith(".csv")]
        if done:
            return done[0]
        assert time.monotonic() < deadline, f"no CSV downloaded: {names}"
        await asyncio.sleep(0.05)


async def test_dashboard_without_keys_and_without_accounting(browser: Any, tmp_path: Path) -> None:
    # No key exists: auth is off, the page needs no key and shows everyone's usage.
    # Behind a path prefix (a reverse proxy's): assets and API calls follow the page's URL.
    (tmp_path / "open").mkdir()
    async with running_service(tmp_path / "open", keys={}, prefix="/team-a") as service:
        await run_in_thread(send_traffic, service.url, None, "chat-model", ["one", "two"])
        await run_in_thread(wait_for_ledger, service.db, 2)
        page = await browser.new_page()
        await page.goto(f"{service.url}/dashboard")
        await report_ready(page)
        assert await page.eval("document.getElementById('login').hidden")
        assert "Auth is off" in await page.text("#who")
        assert_totals(await totals_shown(page), ledger_totals(service.db))
        shown = await table(page)
        assert shown["head"][:2] == ["Key", "Model"] and shown["rows"][0][:2] == ["(no key)", "chat-model"]
        assert await page.eval("window.__cspViolations") == []
        assert page.problems() == []

    # Accounting switched off: no usage API, and the page says so.
    (tmp_path / "off").mkdir()
    async with running_service(tmp_path / "off", keys={}, accounting=False) as service:
        page = await browser.new_page()
        await page.goto(f"{service.url}/dashboard")
        await page.wait_for("document.getElementById('alert').textContent.includes('accounting is disabled')")
        assert await page.eval("document.getElementById('report').hidden") is True
