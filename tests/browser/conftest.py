"""Headless Chromium for the browser tests, driven over the DevTools protocol.

No browser-automation package is needed: Chromium starts with
``--remote-debugging-port=0``, writes the port it chose to ``DevToolsActivePort`` in
its profile folder, and the tests speak CDP over a websocket (``websockets``). Every
test gets a fresh profile and its own Chromium, killed (its process group) at the end.

Tests here are marked ``browser``; they skip with the reason when no Chromium is
installed (``apt-get install -y chromium``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in containers, where the sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--lang=en-US",
    "--window-size=1280,900",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 20.0


def find_chromium() -> str | None:
    """The Chromium executable: ``$CHROMIUM``, a usual path, or one on ``PATH``."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Page.click's watch on the mouse events (see there). _ARM_CLICK scrolls the element
# into view and answers where its centre is and whether the page hit-tests it there.
_ARM_CLICK = """(() => {
  const target = document.querySelector(%s);
  if (!target) return null;
  target.scrollIntoView({block: "center"});
  const r = target.getBoundingClientRect();
  const x = r.left + r.width / 2, y = r.top + r.height / 2;
  const hit = document.elementFromPoint(x, y);
  const outcome = {landed: false, missed: false};
  const watch = (event) => {
    // Only the mouse's own events: the page's script may click too (a download link).
    if (!event.isTrusted) return;
    if (target.contains(event.target)) {
      if (event.type === "click") outcome.landed = true;
      return;
    }
    outcome.missed = true;
    event.stopImmediatePropagation();
    event.preventDefault();
  };
  for (const type of ["mousedown", "mouseup", "click"]) window.addEventListener(type, watch, true);
  window.__clickWatch = {watch, outcome};
  return {x, y, w: r.width, hit: hit !== null && target.contains(hit)};
})()"""
_DISARM_CLICK = """(() => {
  const {watch, outcome} = window.__clickWatch;
  for (const type of ["mousedown", "mouseup", "click"]) window.removeEventListener(type, watch, true);
  return outcome;
})()"""


class CDPError(RuntimeError):
    """A DevTools command answered with an error."""


class CDP:
    """One websocket to the browser; pages are flat sessions on it."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):  # the socket closes when the browser does
            async for raw in self.ws:
                message = json.loads(raw)
                future = self._pending.pop(message["id"], None) if "id" in message else None
                if future is not None:
                    if not future.done():
                        future.set_result(message)
                elif "method" in message:
                    self.events.append(message)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CDPError("the DevTools connection closed"))

    async def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        wait: float = COMMAND_TIMEOUT,
    ) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self.ws.send(json.dumps(message))
        reply = await asyncio.wait_for(future, wait)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        # Collected before any page script runs; CDP-injected code is not subject to the CSP.
        await page.send(
            "Page.addScriptToEvaluateOnNewDocument",
            {
                "source": (
                    "window.__cspViolations = [];"
                    "document.addEventListener('securitypolicyviolation', e =>"
                    " window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));"
                )
            },
        )
        return page

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader


class Page:
    """A tab: navigate, evaluate, click, type, wait, screenshot."""

    def __init__(self, cdp: CDP, session: str) -> None:
        self.cdp = cdp
        self.session = session

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.cdp.send(method, params, session=self.session)

    async def eval(self, expression: str) -> Any:
        """The JSON value of ``expression`` (awaited when it is a promise)."""
        result = await self.send(
            "Runtime.evaluate",
            {
                "expression": expression,
                "returnByValue": True,
                "awaitPromise": True,
            },
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError(f"page error in {expression!r}: {details.get('exception', details)}")
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    async def reload(self) -> None:
        await self.eval("window.__reloading = true")
        await self.send("Page.reload", {"ignoreCache": True})
        await self.wait_for("!window.__reloading && document.readyState === 'complete'")

    async def wait_for(self, expression: str, within: float = 15.0) -> Any:
        """Poll ``expression`` until it is truthy; fail with the page's status and alert."""
        deadline = time.monotonic() + within
        while True:
            with contextlib.suppress(AssertionError, CDPError):  # mid-navigation
                value = await self.eval(expression)
                if value:
                    return value
            if time.monotonic() > deadline:
                shown = await self.eval(
                    "JSON.stringify({status: document.getElementById('status')?.textContent,"
                    " alert: document.getElementById('alert')?.textContent})"
                )
                raise AssertionError(f"timed out waiting for {expression!r}; page shows {shown}")
            await asyncio.sleep(0.05)

    async def click(self, selector: str, within: float = 5.0) -> None:
        """A real mouse click in the middle of the element.

        The layout can move between finding the element and the click: after a full-page
        screenshot the viewport is restored, and the page re-renders its chart on the
        resize. So the mouse events are watched from the window's capture phase: one
        that lands outside the element is stopped before the page sees it, and the
        click is made again (as it is when the element is covered or disabled).
        """
        deadline = time.monotonic() + within
        while True:
            box = await self.eval(_ARM_CLICK % json.dumps(selector))
            assert box and box["w"] > 0, f"{selector} is not on the page or not visible"
            if box["hit"]:
                for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
                    await self.send(
                        "Input.dispatchMouseEvent",
                        {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
                    )
            outcome = await self.eval(_DISARM_CLICK)
            if outcome["landed"] and not outcome["missed"]:
                return
            assert time.monotonic() < deadline, f"a click on {selector} did not reach it: {outcome}"
            await asyncio.sleep(0.05)

    async def type(self, selector: str, text: str) -> None:
        """Focus the field, clear it and type ``text`` as keyboard input."""
        await self.click(selector)
        await self.eval(f"document.querySelector({json.dumps(selector)}).select()")
        await self.send("Input.insertText", {"text": text})

    async def text(self, selector: str) -> str:
        value = await self.eval(f"document.querySelector({json.dumps(selector)})?.innerText ?? null")
        assert value is not None, f"{selector} is not on the page"
        return str(value)

    async def set_viewport(self, width: int, height: int) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {
                "width": width,
                "height": height,
                "deviceScaleFactor": 1,
                "mobile": width < 600,
            },
        )

    async def screenshot(self, path: Path) -> Path:
        """The whole page (not just the viewport) as a PNG."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics["cssContentSize"]
        shot = await self.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            },
        )
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))
        return path

    def problems(self) -> list[str]:
        """Uncaught exceptions and console errors of this page (failed fetches aside)."""
        found = []
        for event in self.cdp.events:
            if event.get("sessionId") != self.session:
                continue
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
            elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(f"console.error: {params.get('args')}")
            elif event["method"] == "Log.entryAdded":
                entry = params.get("entry", {})
                # A 401 answer is logged by the network layer; the page handles it.
                if entry.get("level") == "error" and entry.get("source") != "network":
                    found.append(f"log: {entry.get('text')}")
        return found


@pytest.fixture
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium, or set $CHROMIUM)")
    return path


@pytest.fixture
async def browser(chromium_path: str, tmp_path: Path) -> AsyncIterator[CDP]:
    """A fresh headless Chromium (own profile), connected over the DevTools protocol."""
    from websockets.asyncio.client import connect

    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    log = (tmp_path / "chromium.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        chromium_path,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    cdp: CDP | None = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if process.returncode is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(
                    f"Chromium did not start: {(tmp_path / 'chromium.log').read_text()[-2000:]}"
                )
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        ws = await connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=START_TIMEOUT)
        cdp = CDP(ws)
        yield cdp
    finally:
        if cdp is not None:
            with contextlib.suppress(Exception):
                await cdp.send("Browser.close", wait=5)
            await cdp.aclose()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 5)
        # The group holds Chromium's helper processes (renderer, GPU, zygote) too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await asyncio.wait_for(process.wait(), 5)
        log.close()
