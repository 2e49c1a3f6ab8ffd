"""The lean chain under a real mitmdump: inert built-ins leave, needed ones stay or come back."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.conftest import Backend

PROFILE = """\
metrics: {port: 0}
security: {egress: {allowed_networks: [127.0.0.1/32]}}
"""


def echo_headers(p, backend: Backend) -> dict[str, str]:
    with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
        r = c.get(f"{backend.url}/echo")
    assert r.status_code == 200
    return {k.lower(): v for k, v in r.json()["headers"]}


def test_inert_builtins_are_removed_and_set_ones_kept(
    proxy_factory, backend: Backend, tmp_path: Path
) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(PROFILE)
    p = proxy_factory(
        options={"waypost_profile": str(profile), "modify_headers": "/~q/X-Lean/kept"}
    )
    removed = p.wait_for(r"lean chain: removed inert built-in addons: (.*?)\"").group(1)
    assert "mapremote" in removed and "dumper" in removed
    assert "modifyheaders" not in removed
    assert echo_headers(p, backend)["x-lean"] == "kept"


def test_profile_reload_puts_a_needed_builtin_back(
    proxy_factory, backend: Backend, tmp_path: Path
) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(PROFILE)
    p = proxy_factory(options={"waypost_profile": str(profile)})
    assert "modifyheaders" in p.wait_for("lean chain: removed").string
    assert "x-lean" not in echo_headers(p, backend)
    time.sleep(1.1)  # the reload watcher compares mtimes
    profile.write_text(PROFILE + "mitmproxy: {modify_headers: ['/~q/X-Lean/back']}\n")
    p.wait_for("lean chain: put back modifyheaders")
    assert echo_headers(p, backend)["x-lean"] == "back"


def test_lean_chain_off(proxy_factory, tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(PROFILE)
    p = proxy_factory(options={"waypost_profile": str(profile), "lean_chain": False})
    p.wait_for("management listening")
    assert not any("lean chain" in line for line in p.lines)
