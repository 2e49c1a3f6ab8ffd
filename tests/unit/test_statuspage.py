"""The status page addon: its routes, headers, decisions and config source, and its packaging."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from mitmproxy.test import taddons

from addons import policy, statuspage
from addons.management import Management
from addons.statuspage import STATIC, StatusPage

ROOT = Path(__file__).resolve().parents[2]


class ConfigStandIn:
    """Loaded under the config addon's name: the management app then serves /admin/config."""

    name = "config"


async def call(page: StatusPage, method: str, path: str) -> web.Response:
    handler = page.management_routes()[path]
    return await handler(make_mocked_request(method, path))  # type: ignore[return-value]


def test_render_page_escapes_the_metrics_path() -> None:
    out = statuspage.render_page('<body data-metrics-path="{{metrics_path}}">', '/m"<x>')
    assert out == '<body data-metrics-path="/m&quot;&lt;x&gt;">'


async def test_page_and_assets_are_served_with_a_strict_csp() -> None:
    page = StatusPage()
    with taddons.context(Management(), page) as tctx:
        tctx.options.metrics_path = "/stats"
        resp = await call(page, "GET", "/")
        assert resp.status == 200 and resp.content_type == "text/html"
        assert resp.headers["Content-Security-Policy"] == statuspage.CSP
        assert "'unsafe-inline'" not in statuspage.CSP and "default-src 'none'" in statuspage.CSP
        html = resp.text or ""
        assert 'data-metrics-path="/stats"' in html
        # Everything the page loads is one of our routes (same origin, no CDN).
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert refs and all(r == "data:," or r in page.management_routes() for r in refs)
        for path in ("/status/status.js", "/status/status.css"):
            resp = await call(page, "GET", path)
            assert resp.status == 200 and resp.body
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
        resp = await call(page, "POST", "/")
        assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD"


async def test_decisions_newest_first_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "RECENT", type(policy.RECENT)(maxlen=3))
    for n in range(5):
        policy.decide("filter", f"rule{n}", "10.0.0.1", host="x.test")
    policy.decide("ratelimit", "default", "10.0.0.2", "shadow", decision="limit")
    page = StatusPage()
    with taddons.context(Management(), page):
        resp = await call(page, "GET", "/admin/decisions")
    body = json.loads(resp.text or "")
    assert body["capacity"] == policy.RECENT_SIZE
    got = [(d["policy"], d["decision"], d["rule"]) for d in body["decisions"]]
    assert got == [
        ("ratelimit", "would_block", "default"),
        ("filter", "block", "rule4"),
        ("filter", "block", "rule3"),
    ]
    assert body["decisions"][1]["host"] == "x.test" and body["decisions"][1]["timestamp"]


@pytest.mark.parametrize("served", [False, True])
async def test_profile_names_the_config_endpoint_only_when_served(served: bool) -> None:
    page = StatusPage()
    extra = [ConfigStandIn()] if served else []
    with taddons.context(Management(), page, *extra):
        resp = await call(page, "GET", "/admin/profile")
    body = json.loads(resp.text or "")
    assert body["config_endpoint"] == ("/admin/config" if served else None)
    assert body["profile"] is None  # no profile known


def test_the_static_files_ship_with_the_package() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["addons"]
    for f in STATIC.iterdir():
        rel = f.relative_to(ROOT / "addons").as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), rel
