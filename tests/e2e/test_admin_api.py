"""The admin API through a real bundle: /admin/config (sources, redaction), /admin/version,
/admin/explain (allowed, blocked enforce and shadow, rate-limited read-only, an open breaker),
/admin/openapi.json; every route token-gated like the other admin routes; and the same routes
through the instance app of two workers (test_instance_management's fixture)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import MANAGEMENT, Proxy, wait_until
from tests.e2e import test_instance_management
from tests.e2e.test_instance_management import Instance
from tests.unit.test_admin import spec_validator

# Two real workers behind the instance app (module-scoped, started only for the test using it).
instance = test_instance_management.instance

TOKEN = "s3cret-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

PROFILE = """\
security:
  filtering:
    domains:
      blocked: [ads.example]
      files:
        - {{path: {shadow_list}, id: watch, mode: shadow}}
  rate_limiting:
    requests_per_second: 0.02
    burst: 1
state:
  redis_url: redis://waypost:hunter2@127.0.0.1:6379/0
routing:
  rules:
    - name: api
      match: {{host: api.internal}}
      forward: {{target: "http://127.0.0.1:{dead_port}"}}
circuit_breaker:
  failure_threshold: 1
  timeout: 5m
"""


@pytest.fixture
def admin(proxy_factory: Callable[..., Proxy], tmp_path: Path) -> tuple[Proxy, str]:
    shadow_list = tmp_path / "watch.txt"
    shadow_list.write_text("watched.example\n")
    profile = tmp_path / "profile.yaml"
    profile.write_text(PROFILE.format(shadow_list=shadow_list, dead_port=1))
    p = proxy_factory(
        options={"waypost_profile": str(profile), "metrics_port": 0, "acl_mode": "shadow"},
        env={"ADMIN_TOKEN": TOKEN},
    )
    mport = int(p.wait_for(MANAGEMENT).group(1))
    return p, f"http://127.0.0.1:{mport}"


def direct() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=10)


def test_token_gated_like_every_admin_route(admin: tuple[Proxy, str]) -> None:
    _, base = admin
    with direct() as c:
        for method, path in [("GET", "/admin/config"), ("GET", "/admin/version"),
                             ("POST", "/admin/explain"), ("GET", "/admin/openapi.json")]:  # fmt: skip
            assert c.request(method, base + path).status_code == 401
            wrong = c.request(method, base + path, headers={"Authorization": "Bearer no"})
            assert wrong.status_code == 403
            assert c.request(method, base + path, headers=AUTH).status_code in (200, 400)


def test_admin_off_without_token(proxy_factory: Callable[..., Proxy]) -> None:
    p = proxy_factory(options={"metrics_port": 0})
    base = f"http://127.0.0.1:{int(p.wait_for(MANAGEMENT).group(1))}"
    with direct() as c:
        assert c.get(base + "/admin/config", headers=AUTH).status_code == 404
        assert c.get(base + "/admin/openapi.json", headers=AUTH).status_code == 404


def test_config_sources_and_redaction(admin: tuple[Proxy, str]) -> None:
    _, base = admin
    with direct() as c:
        r = c.get(base + "/admin/config", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    keys = body["keys"]
    assert body["profile"].endswith("profile.yaml")
    blocked = keys["security.filtering.domains.blocked"]
    assert blocked["value"] == ["ads.example"] and blocked["source"] == "file"
    assert blocked["where"] == f"{body['profile']}:4"
    assert keys["admin.token"] == {"value": "********", "option": "admin_token",
                                   "source": "env", "where": "ADMIN_TOKEN"}  # fmt: skip
    assert keys["security.acl.mode"]["source"] == "set"  # --set acl_mode=shadow
    assert keys["metrics.host"] == {"value": "127.0.0.1", "option": "metrics_host",
                                    "source": "default", "where": None}  # fmt: skip
    assert keys["state.redis_url"]["value"] == "redis://waypost:********@127.0.0.1:6379/0"
    assert "hunter2" not in r.text and TOKEN not in r.text
    whys = {d["key"]: d["why"] for d in body["redacted"]}
    assert whys["admin.token"] == "secret" and whys["state.redis_url"] == "url password"


def test_version(admin: tuple[Proxy, str]) -> None:
    p, base = admin
    with direct() as c:
        v = c.get(base + "/admin/version", headers=AUTH).json()
        # The proxy port answers the same (origin-form, addressed to the proxy itself).
        assert c.get(p.url + "/admin/version", headers=AUTH).json() == v
        assert c.get(p.url + "/admin/version").status_code == 401
        on_proxy = c.post(p.url + "/admin/explain", headers=AUTH, json={"url": "http://a.b/"})
        assert on_proxy.status_code == 200 and on_proxy.json()["request"]["url"] == "http://a.b/"
    assert set(v) == {"waypost", "mitmproxy", "python"}
    assert v["python"].count(".") == 2


def _explain(c: httpx.Client, base: str, **body: object) -> dict:
    r = c.post(base + "/admin/explain", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _by(answer: dict) -> dict[str, dict]:
    return {d["addon"]: d for d in answer["decisions"]}


def test_explain(admin: tuple[Proxy, str]) -> None:
    p, base = admin
    with direct() as c:
        bad = c.post(base + "/admin/explain", headers=AUTH, json={"method": "GET"})
        assert bad.status_code == 400 and bad.json()["error"]["fields"][0]["field"] == "url"

        ok = _explain(c, base, url="https://93.184.215.14/", client_ip="192.0.2.1")
        assert ok["outcome"] == "allow", ok
        names = [d["addon"] for d in ok["decisions"]]
        assert names.index("acl") < names.index("ratelimit") < names.index("filter")
        assert names.index("filter") < names.index("egress") < names.index("router")

        blocked = _explain(c, base, url="https://ads.example/x", client_ip="192.0.2.1")
        assert blocked["outcome"] == "block" and blocked["refused_by"] == "filter"
        shadow = _explain(c, base, url="https://watched.example/", client_ip="192.0.2.1")
        f = _by(shadow)["filter"]
        assert f["decision"] == "would_block" and f["shadow"] and f["rule"] == "watch"

        # Explaining takes no token: a fresh client stays allowed however often it is asked.
        for _ in range(3):
            fresh = _by(_explain(c, base, url="https://93.184.215.14/", client_ip="192.0.2.2"))
            assert fresh["ratelimit"]["decision"] == "allow"

    # A real request opens the route's breaker (its backend refuses) and takes 127.0.0.1's token.
    with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as pc:
        assert pc.get("http://api.internal/").status_code >= 500
    with direct() as c:

        def breaker() -> dict:
            return _by(_explain(c, base, url="http://api.internal/", client_ip="127.0.0.1",
                                listener="reverse"))  # fmt: skip

        router = wait_until(lambda: (b := breaker())["router"]["decision"] == "circuit_open" and b)
        assert router["router"]["backends"][0]["circuit"] == "open"
        limited = [breaker()["ratelimit"] for _ in range(2)]
        assert all(d["decision"] == "limit" for d in limited)
    with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as pc:
        assert pc.get("http://api.internal/").status_code == 429  # the bucket, not explain


def test_openapi(admin: tuple[Proxy, str]) -> None:
    validate = spec_validator()
    _, base = admin
    with direct() as c:
        doc = c.get(base + "/admin/openapi.json", headers=AUTH).json()
    validate(doc)
    for path in ("/admin/reload", "/admin/config", "/admin/version", "/admin/explain",
                 "/admin/openapi.json", "/admin/backends", "/admin/cache",
                 "/admin/cache/stats"):  # fmt: skip
        assert path in doc["paths"]
    assert doc["paths"]["/admin/explain"]["post"]["requestBody"]["content"]


def test_the_instance_app_speaks_for_every_worker(instance: Instance) -> None:
    validate = spec_validator()
    with direct() as c:
        auth = {"Authorization": "Bearer s3cret"}  # the instance fixture's profile
        doc = c.get(instance.url + "/admin/openapi.json", headers=auth).json()
        validate(doc)  # one document, not wrapped per worker
        version = c.get(instance.url + "/admin/version", headers=auth).json()
        assert set(version) == {"waypost", "mitmproxy", "python"}
        config = c.get(instance.url + "/admin/config", headers=auth).json()
        assert config["keys"]["admin.token"]["value"] == "********"
        assert len(config["workers"]) == 2
        r = c.post(instance.url + "/admin/explain", headers=auth, json={"url": "http://a.b/"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["request"]["url"] == "http://a.b/" and answer["outcome"] == "allow"
        assert [w["status"] for w in answer["workers"]] == [200, 200]
        assert c.get(instance.url + "/admin/config").status_code == 401
