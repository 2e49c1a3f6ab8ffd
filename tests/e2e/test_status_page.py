"""The status page in a real headless chromium, driven over CDP (tests/e2e/browser.py).

A real bundle with a reverse route to two local backends, active health checks, a blocked
domain, the management port and an admin token. The page must load without console errors or
failed requests, take the token, list a blocked request among the recent decisions and show a
killed backend down within one refresh. A screenshot is written to $WAYPOST_TEST_ARTIFACTS
(default: the test's tmp_path) and its path printed.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import MANAGEMENT, REVERSE, Proxy
from tests.e2e import test_instance_management
from tests.e2e.browser import Browser, Page, chromium
from tests.e2e.router_helpers import NamedBackend, write_profile

TOKEN = "status-page-token"
# Two real workers behind the instance app (the supervisor's management port), module-scoped.
instance = test_instance_management.instance
REFRESH = 1.0  # seconds: the page's ?refresh=


@pytest.fixture
def backends() -> Iterator[list[NamedBackend]]:
    started = [NamedBackend(name) for name in ("a", "b")]
    yield started
    for b in started:
        b.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    where = os.environ.get("WAYPOST_TEST_ARTIFACTS")
    return Path(where) if where else tmp_path / "artifacts"


async def _forward_port(client: httpx.AsyncClient, mgmt: int) -> int:
    """The forward listener's port: mitmproxy 12 binds the command line's listener before the
    profile's, so the log's first line may name a listener that is gone; readiness lists both."""
    for _ in range(200):
        ready = (await client.get(f"http://127.0.0.1:{mgmt}/health/readiness")).json()
        addrs = ready["checks"]["listeners"]["addresses"]
        forward = [a for a in addrs if a.startswith("127.0.0.1:")]
        if len(addrs) == 2 and forward:
            return int(forward[0].rpartition(":")[2])
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no forward listener among {addrs}")


def _chromium() -> str:
    exe = chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed")
    return exe


async def _use_token(page: Page, token: str) -> None:
    await page.evaluate(
        f"document.querySelector('#token').value = {json.dumps(token)};"
        "document.querySelector('#token-form').requestSubmit()"
    )


@pytest.mark.timeout(150)
async def test_status_page_in_a_headless_browser(
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
    backends: list[NamedBackend],
    artifacts: Path,
) -> None:
    exe = _chromium()
    a, b = backends
    profile = write_profile(
        tmp_path,
        {
            "admin": {"token": TOKEN},
            "routing": {
                "listeners": [
                    {"mode": "forward"},
                    # Apart from the forward listener's 127.0.0.1:0 (one address, one listener).
                    {"mode": "reverse", "host": "127.0.0.2", "port": 0},
                ],
                "rules": [
                    {
                        "name": "ab",
                        "forward": {
                            "backends": [{"url": x.url, "name": x.name} for x in (a, b)]
                        },
                    }
                ],
            },
            "health_checks": {"enabled": True, "interval": "200ms", "timeout": "1s",
                              "unhealthy_threshold": 2, "healthy_threshold": 2},
            "security": {"filtering": {"domains": {"blocked": ["blocked.test"]}}},
        },
    )  # fmt: skip
    p = proxy_factory(options={"waypost_profile": str(profile)}, wait=False)
    reverse, mgmt = await asyncio.to_thread(
        lambda: [int(p.wait_for(rx, timeout=40).group(g)) for rx, g in ((REVERSE, 2), (MANAGEMENT, 1))]
    )  # fmt: skip
    page_url = f"http://127.0.0.1:{mgmt}/?refresh={REFRESH:g}"

    async with httpx.AsyncClient(timeout=10) as client:
        forward = await _forward_port(client, mgmt)
        for _ in range(6):
            assert (await client.get(f"http://127.0.0.2:{reverse}/x")).status_code == 200
        # Not on the proxy port: `/` there is an ordinary proxied request.
        assert (await client.get(f"http://127.0.0.2:{reverse}/")).json()["path"] == "/"

    async with Browser.launch(tmp_path / "chromium", exe) as browser:
        page = await browser.new_page()
        await page.navigate(page_url)
        await page.wait_for("Number(document.body.dataset.refreshes) >= 2")
        (doc,) = page.responses(page_url)
        csp = {k.lower(): v for k, v in doc["headers"].items()}["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        # Without the token: health, traffic and backend health; the rest says it is hidden.
        assert await page.evaluate("document.querySelector('#readiness').dataset.status") == "ready"
        assert (
            await page.evaluate(
                "document.querySelector('#backends tr[data-backend=\"a\"]').dataset.status"
            )
            == "healthy"
        )
        assert "hidden without the admin token" in await page.evaluate(
            "document.querySelector('#decisions').textContent"
        )
        await page.wait_for("Number(document.querySelector('#traffic .big').textContent) >= 0")

        await _use_token(page, TOKEN)
        shown = await page.wait_for("document.querySelector('#profile')?.textContent")
        assert str(profile) in shown
        assert await page.evaluate(
            f"sessionStorage.getItem('waypost-admin-token') === {json.dumps(TOKEN)}"
        )
        assert "Admin token in use" in await page.evaluate(
            "document.querySelector('#token-note').textContent"
        )

        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{forward}", timeout=10) as client:
            refused = await client.get("http://blocked.test/ads")
        assert refused.status_code == 403
        await page.wait_for(
            "document.querySelector('#decisions tr[data-rule=\"blocked.test\"]')"
            "?.dataset.decision === 'block'",
            timeout=REFRESH + 5,
        )

        assert (
            await page.evaluate(
                "document.querySelector('#backends tr[data-backend=\"a\"]').dataset.status"
            )
            == "healthy"
        )
        await asyncio.to_thread(a.stop)
        await asyncio.to_thread(p.wait_for, r"backend a is unhealthy", 10)
        # Within one refresh of the proxy seeing it (plus the request's own time).
        await page.wait_for(
            "document.querySelector('#backends tr[data-backend=\"a\"]')?.dataset.status"
            " === 'unhealthy'",
            timeout=REFRESH + 1.5,
            interval=0.05,
        )

        shot = await page.screenshot(artifacts / "status_page.png")
        print(f"status page screenshot: {shot}")
        assert shot.stat().st_size > 10_000

        assert page.console_errors() == []
        assert page.failed_requests() == []


@pytest.mark.timeout(120)
async def test_status_page_speaks_for_every_worker(
    instance: test_instance_management.Instance, tmp_path: Path, artifacts: Path
) -> None:
    """Through the instance app: the page from one worker, the admin answers from both."""
    exe = _chromium()
    async with Browser.launch(tmp_path / "chromium", exe) as browser:
        page = await browser.new_page()
        await page.navigate(f"{instance.url}/?refresh={REFRESH:g}")
        await page.wait_for("Number(document.body.dataset.refreshes) >= 2")
        await _use_token(page, test_instance_management.AUTH["Authorization"].split()[1])
        assert "profile.yaml" in await page.wait_for(
            "document.querySelector('#profile')?.textContent"
        )
        # Readiness lists each worker and its own checks.
        assert (
            await page.evaluate(
                "[...document.querySelectorAll('#health tr[data-check^=\"worker \"]')].length"
            )
            == 2
        )
        worker_tables = "[...document.querySelectorAll('#cache h3')].map(h => h.textContent)"
        assert await page.wait_for(worker_tables) == ["worker 0", "worker 1"]
        assert "No policy decision yet." in await page.evaluate(
            "document.querySelector('#decisions').textContent"
        )
        shot = await page.screenshot(artifacts / "status_page_workers.png")
        print(f"status page screenshot (two workers): {shot}")
        assert page.console_errors() == []
        assert page.failed_requests() == []

        # A wrong token: refused once (four 403s), dropped, said so; no request repeats it.
        start = len(page.events)
        await _use_token(page, "wrong")
        assert "refused" in await page.wait_for(
            "document.querySelector('#token-note').textContent.includes('refused')"
            " && document.querySelector('#token-note').textContent"
        )
        assert await page.evaluate("sessionStorage.getItem('waypost-admin-token')") is None
        shown = await page.evaluate("Number(document.body.dataset.refreshes)")
        await page.wait_for(f"Number(document.body.dataset.refreshes) >= {shown + 2}")
        refused = page.failed_requests(start)
        assert len(refused) == 4 and all("/admin/" in r and "HTTP 403" in r for r in refused)
        assert "hidden without the admin token" in await page.evaluate(
            "document.querySelector('#decisions').textContent"
        )
