"""Domain filter through a real mitmdump: plain HTTP, CONNECT, the tunnel's SNI, shadow mode,
list files and their hot reload under traffic, and the bundle driven by a profile."""

from __future__ import annotations

import json
import os
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from tests.conftest import (
    MANAGEMENT,
    Backend,
    connect_tunnel,
    json_body,
    raw_request,
    status_of,
    wait_until,
)
from tests.e2e.filter_helpers import tls_through
from tests.e2e.test_tlspolicy import TlsOrigin

FILTER = "addons/filter.py"


def get(proxy_port: int, url: str, host: str | None = None) -> bytes:
    authority = host or url.split("/")[2]
    return raw_request(
        proxy_port, f"GET {url} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode(), timeout=10
    )


def connect(proxy_port: int, target: str) -> bytes:
    return raw_request(proxy_port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())


def assert_blocked(resp: bytes, rule: str) -> dict:
    assert status_of(resp) == 403, resp[:300]
    err = json_body(resp)["error"]
    assert err["code"] == "DOMAIN_BLOCKED"
    assert err["rule"] == rule
    return err


# --- plain HTTP -------------------------------------------------------------------------------


def test_plain_http_blocked_and_host_header_cannot_override(proxy_factory, backend: Backend):
    p = proxy_factory(scripts=(FILTER,), options={"filter_blocked": ["*.ads.test", "tracker.test"]})
    err = assert_blocked(get(p.port, "http://x.ads.test/a"), "*.ads.test")
    assert "x.ads.test" in err["message"]
    # A blocked URL with an allowed Host header: decided on the URL, the host that is dialled.
    assert_blocked(get(p.port, "http://tracker.test/", host="allowed.test"), "tracker.test")
    # An allowed URL with a blocked Host header goes through to the URL's host.
    ok = get(p.port, f"{backend.url}/echo/f", host="tracker.test")
    assert status_of(ok) == 200
    # Wildcards cover subdomains, not the bare name (mitmproxy answers 502: .test never resolves).
    assert status_of(get(p.port, "http://ads.test/")) == 502
    p.wait_for(r"filter block rule=tracker\.test")


def test_audit_client_ip_behind_a_trusted_proxy_is_the_forwarded_client(proxy_factory):
    # The filter loaded alone declares forwarding_trusted_proxies (kernel/net.py), and its audit
    # records the client the ACL and the rate limiter decide on: behind a trusted load balancer,
    # the X-Forwarded-For client, not the balancer.
    p = proxy_factory(
        scripts=(FILTER, "addons/accesslog.py"),
        options={"filter_blocked": "tracker.test", "forwarding_trusted_proxies": "127.0.0.0/8"},
    )
    request = "GET http://tracker.test/ HTTP/1.1\r\nHost: tracker.test\r\n{}\r\n"
    for xff in ("X-Forwarded-For: 203.0.113.9, 127.0.0.2\r\n", ""):
        assert_blocked(
            raw_request(p.port, request.format(xff).encode(), timeout=10), "tracker.test"
        )

    def audit() -> list[dict]:
        return [j for j in p.json_lines() if j.get("logger") == "waypost.audit"]

    lines = wait_until(lambda: len(audit()) >= 2 and audit())
    assert [j["client_ip"] for j in lines] == ["203.0.113.9", "127.0.0.1"]


def test_allowlist_mode(proxy_factory, backend: Backend):
    p = proxy_factory(
        scripts=(FILTER,), options={"filter_list_mode": "allowlist", "filter_allowed": "localhost"}
    )
    r = httpx.get(f"http://localhost:{backend.port}/echo/allow", proxy=p.url, timeout=10)
    assert r.status_code == 200
    assert_blocked(get(p.port, f"{backend.url}/echo/ip"), "allowlist")  # IP literals too
    assert_blocked(get(p.port, "http://news.test/"), "allowlist")


def test_mixed_mode_and_ip_literal_setting(proxy_factory, backend: Backend):
    p = proxy_factory(
        scripts=(FILTER,),
        options={
            "filter_list_mode": "mixed",
            "filter_allowed": ["*.corp.test", "127.0.0.1"],
            "filter_blocked": "bad.corp.test",
        },
    )
    assert status_of(get(p.port, f"{backend.url}/echo/m")) == 200
    assert_blocked(get(p.port, "http://bad.corp.test/"), "bad.corp.test")
    assert_blocked(get(p.port, "http://other.test/"), "allowlist")
    q = proxy_factory(scripts=(FILTER,), options={"filter_ip_literals": "deny"})
    assert_blocked(get(q.port, f"{backend.url}/echo/ip"), "ip_literals")


def test_shadow_mode_passes_and_logs_would_block(proxy_factory, backend: Backend):
    p = proxy_factory(
        scripts=(FILTER,), options={"filter_blocked": "127.0.0.1", "filter_mode": "shadow"}
    )
    r = httpx.get(f"{backend.url}/echo/shadow", proxy=p.url, timeout=10)
    assert r.status_code == 200
    p.wait_for(r"filter would_block rule=127\.0\.0\.1")


def test_custom_response_body(proxy_factory):
    p = proxy_factory(
        scripts=(FILTER,),
        options={"filter_blocked": "x.test", "filter_response_body": "Blocked by IT policy."},
    )
    err = assert_blocked(get(p.port, "http://x.test/"), "x.test")
    assert err["message"] == "Blocked by IT policy."


# --- CONNECT and SNI ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_origin(ca: trustme.CA) -> Iterator[TlsOrigin]:
    o = TlsOrigin(ca, names=("localhost", "allowed.test", "blocked.test"))
    yield o
    o.close()


@pytest.fixture
def cafile(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def test_connect_to_blocked_name_gets_403_without_upstream(proxy_factory, tls_origin):
    p = proxy_factory(scripts=(FILTER,), options={"filter_blocked": "localhost"})
    assert_blocked(connect(p.port, f"localhost:{tls_origin.port}"), "localhost")
    assert tls_origin.accepts == 0


def test_blocked_sni_in_an_allowed_tunnel_is_refused(proxy_factory, tls_origin, cafile):
    p = proxy_factory(
        scripts=(FILTER, "addons/tlspolicy.py"), options={"filter_blocked": "blocked.test"}
    )
    # Control: an allowed SNI handshakes with the origin's own certificate (passthrough).
    assert b"origin" in tls_through(
        connect_tunnel(p.port, f"localhost:{tls_origin.port}"), "allowed.test", cafile
    )
    assert tls_origin.snis == ["allowed.test"]
    # The CONNECT names an allowed host, the ClientHello a blocked one: the proxy closes the
    # client connection and the ClientHello never reaches the origin.
    sock = connect_tunnel(p.port, f"localhost:{tls_origin.port}")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_through(sock, "blocked.test", cafile)
    p.wait_for(r"filter block rule=blocked\.test")
    assert tls_origin.snis == ["allowed.test"]


def test_blocked_sni_in_shadow_mode_passes(proxy_factory, tls_origin, cafile):
    p = proxy_factory(
        scripts=(FILTER, "addons/tlspolicy.py"),
        options={"filter_blocked": "blocked.test", "filter_mode": "shadow"},
    )
    sock = connect_tunnel(p.port, f"localhost:{tls_origin.port}")
    assert b"origin" in tls_through(sock, "blocked.test", cafile)
    p.wait_for(r"filter would_block rule=blocked\.test")


def test_sni_check_can_be_turned_off(proxy_factory, tls_origin, cafile):
    p = proxy_factory(
        scripts=(FILTER, "addons/tlspolicy.py"),
        options={"filter_blocked": "blocked.test", "filter_check_sni": False},
    )
    sock = connect_tunnel(p.port, f"localhost:{tls_origin.port}")
    assert b"origin" in tls_through(sock, "blocked.test", cafile)


# --- list files -------------------------------------------------------------------------------


def test_list_file_formats(proxy_factory, tmp_path: Path):
    lst = tmp_path / "mixed.txt"
    lst.write_text(
        "# a hosts file, a plain list and AdBlock rules in one\n"
        "127.0.0.1 localhost\n"
        "0.0.0.0 hosts.test\n"
        "plain.test\n"
        "||adblock.test^\n"
        "||withoptions.test^$third-party\n"
        "example.test##.banner\n"
    )
    p = proxy_factory(scripts=(FILTER,), options={"filter_files": json.dumps([str(lst)])})
    p.wait_for(r"filter list .*mixed\.txt loaded: 4 entries, 2 comments, 2 junk lines")
    for url in ("http://hosts.test/", "http://plain.test/", "http://x.adblock.test/"):
        err = assert_blocked(get(p.port, url), "mixed")
        assert "mixed" in err["message"]
    assert status_of(get(p.port, "http://withoptions.test/")) == 502  # junk is not a block


def test_hot_reload_under_traffic_without_a_failed_request(
    proxy_factory, backend: Backend, tmp_path: Path
):
    lst = tmp_path / "ads.txt"
    lst.write_text("0.0.0.0 gen0.test\n")
    p = proxy_factory(
        scripts=(FILTER,),
        options={"filter_files": json.dumps([str(lst)]), "filter_reload_interval": "100ms"},
    )
    results: list[int | str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
            while not stop.is_set() and len(results) < 3000:
                try:
                    results.append(c.get(f"{backend.url}/echo/reload").status_code)
                except httpx.HTTPError as e:
                    results.append(repr(e))

    workers = [threading.Thread(target=load) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        for gen in range(1, 6):
            body = "".join(f"0.0.0.0 filler{i}.gen{gen}.test\n" for i in range(20_000))
            body += f"||gen{gen}.test^\n"
            if gen % 2:
                tmp = lst.with_suffix(".new")
                tmp.write_text(body)
                os.replace(tmp, lst)  # atomic rename, as most tools write
            else:
                lst.write_text(body)  # rewritten in place
            wait_until(lambda g=gen: status_of(get(p.port, f"http://x.gen{g}.test/")) == 403, 15)
            assert status_of(get(p.port, f"http://gen{gen - 1}.test/")) == 502
        # A bad file keeps the list it had.
        lst.write_text("<html>503 from the list mirror</html>\n")
        p.wait_for(r"filter list .*ads\.txt refused, keeping the list loaded before")
        assert status_of(get(p.port, "http://x.gen5.test/")) == 403
    finally:
        stop.set()
        for w in workers:
            w.join(20)
    assert len(results) > 20
    failures = [r for r in results if r != 200]
    assert not failures, failures[:5]


def test_missing_list_file_stops_mitmdump(proxy_factory, tmp_path: Path):
    p = proxy_factory(
        scripts=(FILTER,),
        options={"filter_files": json.dumps([str(tmp_path / "nope.txt")])},
        wait=False,
    )
    p.wait_for(r"filter_files: cannot read .*nope\.txt")
    assert p.proc.wait(15) != 0


# --- the bundle ---------------------------------------------------------------------------------

PROFILE = """\
metrics: {{enabled: true, host: 127.0.0.1, port: 0}}
security:
  egress: {{connect_ports: ["{port}"], allowed_networks: [127.0.0.1/32]}}
  filtering:
    domains:
      blocked: ["*.ads.test", localhost]
      files: [{{path: {shadow}, id: trial, mode: shadow}}]
    response: {{body: "Blocked by policy."}}
"""


def test_bundle_profile_plain_http_and_connect(proxy_factory, backend: Backend, tmp_path: Path):
    trial = tmp_path / "trial.txt"
    trial.write_text("127.0.0.1\n")
    profile = tmp_path / "p.yaml"
    profile.write_text(PROFILE.format(port=backend.port, shadow=trial))
    p = proxy_factory(options={"waypost_profile": str(profile)})
    mgmt = int(p.wait_for(MANAGEMENT).group(1))
    err = assert_blocked(get(p.port, "http://x.ads.test/"), "*.ads.test")
    assert err["message"] == "Blocked by policy."
    assert_blocked(connect(p.port, f"localhost:{backend.port}"), "localhost")
    # The trial list is in shadow mode: 127.0.0.1 passes and is counted as would_block.
    r = httpx.get(f"{backend.url}/echo/bundle", proxy=p.url, timeout=10, trust_env=False)
    assert r.status_code == 200

    def blocked_lines() -> list[dict]:
        access = [j for j in p.json_lines() if j.get("message") == "request"]
        return [j for j in access if j.get("error_code") == "DOMAIN_BLOCKED"]

    blocked = wait_until(blocked_lines)
    assert blocked[0]["rule"] == "*.ads.test"
    audit = [j for j in p.json_lines() if j.get("logger") == "waypost.audit"]
    assert any(j["decision"] == "would_block" and j["rule"] == "trial" for j in audit)
    metrics = httpx.get(f"http://127.0.0.1:{mgmt}/metrics", timeout=10).text
    assert 'policy_decisions_total{decision="block",policy="filter",rule="*.ads.test"}' in metrics
    assert 'policy_decisions_total{decision="would_block",policy="filter",rule="trial"}' in metrics
    ready = httpx.get(f"http://127.0.0.1:{mgmt}/health/readiness", timeout=10).json()
    assert ready["checks"]["filter"]["lists"]["trial"]["entries"] == 1
