"""A small Chrome DevTools Protocol driver: Debian's chromium, headless, over aiohttp's websocket.

    async with Browser.launch(tmp_path / "chromium") as browser:
        page = await browser.new_page()
        await page.navigate("http://127.0.0.1:9090/")
        assert await page.wait_for("document.title") == "..."
        await page.screenshot(path)

Chromium is started with --remote-debugging-port=0 and its profile in the given directory; the
port it picked is read from that directory's DevToolsActivePort. It is stopped by its PID
(SIGTERM, then SIGKILL). One websocket to the browser carries every command; each page is a
target attached with flatten=true, its commands and events tagged with its sessionId.
No selenium or playwright: nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

STARTUP_TIMEOUT = 30.0
COMMAND_TIMEOUT = 15.0


def chromium() -> str | None:
    """The chromium executable, if one is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class CdpError(RuntimeError):
    pass


class Page:
    """One tab: commands, and every event it sent (console, network, ...) kept in `events`."""

    def __init__(self, browser: Browser, session_id: str) -> None:
        self.browser = browser
        self.session_id = session_id
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def _event(self, message: dict[str, Any]) -> None:
        self.events.append(message)
        self._changed.set()

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session_id)

    async def wait_event(
        self, method: str, timeout: float = COMMAND_TIMEOUT, start: int = 0
    ) -> dict:
        """The first event `method` at or after index `start` of `events`."""
        deadline = time.monotonic() + timeout
        seen = start
        while True:
            for event in self.events[seen:]:
                if event["method"] == method:
                    return event
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {method} event within {timeout} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def navigate(self, url: str, timeout: float = COMMAND_TIMEOUT) -> None:
        start = len(self.events)
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise CdpError(f"navigating to {url}: {result['errorText']}")
        await self.wait_event("Page.loadEventFired", timeout, start)

    async def evaluate(self, expression: str) -> Any:
        """The expression's value (JSON-serialisable; promises awaited)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.1) -> Any:
        """Poll until `expression` is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{expression!r} not truthy within {timeout} s (last: {value!r})"
                )
            await asyncio.sleep(interval)

    async def screenshot(self, path: Path) -> Path:
        result = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(result["data"]))
        return path

    def console_errors(self, start: int = 0) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (CSP violations, failed
        loads) among the events from index `start` on."""
        out = []
        for e in self.events[start:]:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"]))
            elif e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"{p['entry']['source']}: {p['entry']['text']}")
        return out

    def failed_requests(self, start: int = 0) -> list[str]:
        """Requests that failed (no answer, blocked) or were answered with 4xx/5xx, among the
        events from index `start` on."""
        urls = {
            e["params"]["requestId"]: e["params"]["request"]["url"]
            for e in self.events
            if e["method"] == "Network.requestWillBeSent"
        }
        out = []
        for e in self.events[start:]:
            p = e.get("params", {})
            if e["method"] == "Network.loadingFailed":
                out.append(f"{urls.get(p['requestId'], '?')}: {p['errorText']}")
            elif e["method"] == "Network.responseReceived" and p["response"]["status"] >= 400:
                out.append(f"{p['response']['url']}: HTTP {p['response']['status']}")
        return out

    def responses(self, url: str) -> list[dict[str, Any]]:
        """The responses received for `url` (status, headers, ...)."""
        return [
            e["params"]["response"]
            for e in self.events
            if e["method"] == "Network.responseReceived" and e["params"]["response"]["url"] == url
        ]


class Browser:
    """A headless chromium process and the websocket to it."""

    def __init__(
        self, proc: subprocess.Popen[bytes], session: aiohttp.ClientSession, ws: Any
    ) -> None:
        self.proc = proc
        self._session = session
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(
        cls, profile_dir: Path, executable: str | None = None
    ) -> AsyncIterator[Browser]:
        exe = executable or chromium()
        if exe is None:
            raise FileNotFoundError("chromium is not installed")
        profile_dir.mkdir(parents=True, exist_ok=True)
        args = [
            exe,
            "--headless=new",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={profile_dir}",
            # The test runs as root in CI containers, where chromium's sandbox cannot start.
            "--no-sandbox",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1000",
            "about:blank",
        ]
        with open(profile_dir / "chromium.log", "wb") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        session: aiohttp.ClientSession | None = None
        browser: Browser | None = None
        try:
            url = await _devtools_url(proc, profile_dir)
            session = aiohttp.ClientSession()
            ws = await session.ws_connect(url, max_msg_size=0, timeout=COMMAND_TIMEOUT)
            browser = cls(proc, session, ws)
            yield browser
        finally:
            if browser is not None:
                await browser._close()
            if session is not None:
                await session.close()
            _stop(proc)

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = self._pages[attached["sessionId"]] = Page(self, attached["sessionId"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            await page.send(f"{domain}.enable")
        return page

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None
    ) -> dict[str, Any]:
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        fut = self._pending[msg_id] = asyncio.get_running_loop().create_future()
        await self._ws.send_str(json.dumps(message))
        try:
            return await asyncio.wait_for(fut, COMMAND_TIMEOUT)
        finally:
            self._pending.pop(msg_id, None)

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.get(data["id"])
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(CdpError(f"{data['error']}"))
                    else:
                        fut.set_result(data.get("result", {}))
            elif (page := self._pages.get(data.get("sessionId", ""))) is not None:
                page._event(data)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CdpError("the browser closed its DevTools connection"))

    async def _close(self) -> None:
        with contextlib.suppress(CdpError, TimeoutError, ConnectionError):
            await asyncio.wait_for(self.send("Browser.close"), 5)
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def _devtools_url(proc: subprocess.Popen[bytes], profile_dir: Path) -> str:
    """The browser's websocket URL, from DevToolsActivePort (port, then path) once written."""
    marker = profile_dir / "DevToolsActivePort"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (profile_dir / "chromium.log").read_text(errors="replace")
            raise RuntimeError(f"chromium exited with {proc.returncode}:\n{log[-3000:]}")
        lines = marker.read_text().splitlines() if marker.exists() else []
        if len(lines) >= 2:
            return f"ws://127.0.0.1:{int(lines[0])}{lines[1]}"
        await asyncio.sleep(0.05)
    raise TimeoutError(f"chromium wrote no {marker} within {STARTUP_TIMEOUT} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
