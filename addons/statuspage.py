"""The status page: one HTML page on the management port that reads the JSON endpoints.

Served through the management app's `management_routes()` extension point, so only on the
management listener (the proxy port answers `/` as the proxied request it is):

    GET /                      the page (addons/static/status/index.html), strict CSP
    GET /status/status.js      its script: refreshes from the endpoints below every few seconds
    GET /status/status.css     its style sheet
    GET /admin/decisions       the last policy decisions (`policy.RECENT`), newest first
    GET /admin/profile         where the config comes from: the profile path, whether it is
                               loaded, the last reload error, and the /admin/config route when
                               an addon serves one (the page reads it then)

Everything is served by Waypost itself (no CDN, no build step). The page reads
/health/liveness, /health/readiness and the metrics path without a token; the admin token,
typed once and kept in the tab's sessionStorage, unlocks /admin/*.
With workers, `/` and the static files come from one worker, /admin/* from every one (merged by
the instance app; the page lists each worker's decisions).

Hooks: none besides management_routes(). Options: none (metrics_path and admin_token are the
management addon's).
"""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from mitmproxy import ctx

from addons import errors, policy

STATIC = Path(__file__).resolve().parent / "static" / "status"
# The page runs only its own same-origin script and style sheet and talks only to its origin;
# the favicon is an empty data: URL so that the browser asks for no /favicon.ico.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_ASSETS = {
    "/status/status.js": ("status.js", "text/javascript"),
    "/status/status.css": ("status.css", "text/css"),
}
CONFIG_ROUTE = "/admin/config"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def render_page(template: str, metrics_path: str) -> str:
    """The page with the metrics path the script scrapes filled in."""
    return template.replace("{{metrics_path}}", html.escape(metrics_path, quote=True))


def recent_decisions() -> list[dict[str, object]]:
    """The kept policy decisions, newest first."""
    return list(reversed(policy.RECENT))


def _refuse_method(request: web.Request) -> web.Response | None:
    if request.method in ("GET", "HEAD"):
        return None
    return errors.web_error("METHOD_NOT_ALLOWED", "Use GET.", headers={"Allow": "GET, HEAD"})


def _json(payload: dict[str, object]) -> web.Response:
    # default=str: a policy's details are the caller's values (hosts, ports, counts).
    return web.Response(
        text=json.dumps(payload, default=str),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


class StatusPage:
    def __init__(self) -> None:
        # Read once: the files ship with the package and do not change while it runs.
        self._template = (STATIC / "index.html").read_text(encoding="utf-8")
        self._assets = {
            path: ((STATIC / name).read_bytes(), kind) for path, (name, kind) in _ASSETS.items()
        }

    def management_routes(self) -> dict[str, Handler]:
        routes: dict[str, Handler] = {
            "/": self._page,
            "/admin/decisions": self._decisions,
            "/admin/profile": self._profile,
        }
        for path in self._assets:
            routes[path] = self._asset
        return routes

    async def _page(self, request: web.Request) -> web.Response:
        refusal = _refuse_method(request)
        if refusal is not None:
            return refusal
        body = render_page(self._template, ctx.options.metrics_path)
        return web.Response(text=body, content_type="text/html", headers=_HEADERS)

    async def _asset(self, request: web.Request) -> web.Response:
        refusal = _refuse_method(request)
        if refusal is not None:
            return refusal
        body, kind = self._assets[request.path]
        return web.Response(body=body, content_type=kind, headers=_HEADERS)

    async def _decisions(self, request: web.Request) -> web.Response:
        refusal = _refuse_method(request)
        if refusal is not None:
            return refusal
        return _json({"capacity": policy.RECENT_SIZE, "decisions": recent_decisions()})

    async def _profile(self, request: web.Request) -> web.Response:
        refusal = _refuse_method(request)
        if refusal is not None:
            return refusal
        cfg = ctx.master.addons.get("config")
        path = getattr(cfg, "path", None)
        return _json(
            {
                "profile": path() if callable(path) else None,
                "loaded": getattr(cfg, "loaded", None),
                "reload_error": getattr(cfg, "reload_error", None),
                "config_endpoint": CONFIG_ROUTE if self._config_served() else None,
            }
        )

    def _config_served(self) -> bool:
        """Whether /admin/config answers: the management app serves it while the config addon
        is loaded (else 404). The page asks for it only then, so that a bundle without it
        costs the page no 404 (a console error in every browser)."""
        for name in ("management", "config"):
            if ctx.master.addons.get(name) is None:
                return False
        return True


addons = [StatusPage()]
