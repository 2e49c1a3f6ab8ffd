"""Test-only addon that extends the management app: one admin route, one public route and a
readiness check whose state `--set fake_extension_ready=false` flips."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from mitmproxy import ctx


class Extension:
    def load(self, loader: Any) -> None:
        loader.add_option("fake_extension_ready", bool, True, "Readiness of the fake check.")

    def management_routes(self) -> dict[str, Any]:
        return {"/admin/fake": self._admin, "/fake/public": self._public}

    def readiness_check(self) -> tuple[str, dict[str, Any], bool]:
        ready = ctx.options.fake_extension_ready
        return "fake", {"ok": ready}, ready

    async def _admin(self, request: web.Request) -> web.Response:
        return web.json_response({"admin": True, "method": request.method})

    async def _public(self, request: web.Request) -> web.Response:
        return web.json_response({"public": True})


addons = [Extension()]
