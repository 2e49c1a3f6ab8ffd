"""Named local backends for the router tests: each answers with its name, can fail its health
check, and can be stopped and started again on the same port."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web


class NamedBackend:
    """An aiohttp origin on 127.0.0.1 in its own thread: `GET /...` answers
    `{"backend": name, "path": ..., "host": ...}`; `/health` answers 200 unless `healthy` is
    False; `stop()` closes its port (connections refused), `start()` reopens the same port."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.healthy = True
        self.hits = 0
        self.health_hits = 0
        self.status = 200  # what non-health requests answer
        self.delay = 0.0  # seconds before answering them
        self.headers: dict[str, str] = {}
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _app(self) -> web.Application:
        async def health(request: web.Request) -> web.Response:
            self.health_hits += 1
            return web.Response(status=200 if self.healthy else 503, text="health\n")

        async def any_path(request: web.Request) -> web.Response:
            self.hits += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            body = {"backend": self.name, "path": request.path_qs, "host": request.host}
            return web.json_response(body, status=self.status, headers=self.headers)

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_route("*", "/{tail:.*}", any_path)
        return app

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def start(self) -> None:
        async def go() -> None:
            self._runner = web.AppRunner(self._app(), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        self._run(go())

    def stop(self) -> None:
        if self._runner is not None:
            self._run(self._runner.cleanup())
            self._runner = None

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def write_profile(tmp_path: Path, data: dict[str, Any]) -> Path:
    base: dict[str, Any] = {
        "metrics": {"port": 0},
        "admin": {"token": "secret"},
        "logging": {"level": "info"},
    }
    for key, value in data.items():
        base[key] = value
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(base))))
    return path
