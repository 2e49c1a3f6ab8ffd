"""The admin API: /admin/config (sources, redaction), /admin/version, /admin/explain (every
policy's read-only explain), /admin/openapi.json (every served route, valid 3.1, examples)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from mitmproxy import ctx, exceptions
from mitmproxy.test import taddons
from pydantic import BaseModel, ValidationError

from addons import acl, contentfilter, egress, filter, hygiene, management, ratelimit
from addons.admin import effective, explain, models, openapi, routes
from addons.caching.addon import Cache
from addons.config import Config
from addons.routing.router import Router

TOKEN = {"Authorization": "Bearer s3cret"}


def spec_validator() -> Callable[[dict[str, Any]], None]:
    """openapi-spec-validator's `validate` (a dev dependency): skipped when it is missing, except
    in CI (`CI` set), where a missing validator fails."""
    try:
        from openapi_spec_validator import validate
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("openapi-spec-validator (a dev dependency) is not installed")
    return validate  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WAYPOST_PROFILE", "PROXY_PORT", "LOG_LEVEL", "ADMIN_TOKEN"):
        monkeypatch.delenv(var, raising=False)


# --- redaction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, shown, why",
    [
        ("admin_token", "s3cret", "********", "secret"),
        ("cli_token", "", "", None),
        ("upstream_auth", "user:pass", "********", "secret"),
        ("state_redis_url", "redis://:pw@[::1]:6379", "redis://:********@[::1]:6379",
         "url password"),
        ("state_redis_url", "redis://u:pw@redis:6379/0", "redis://u:********@redis:6379/0",
         "url password"),
        ("state_redis_url", "redis://redis:6379/0", "redis://redis:6379/0", None),
        ("listen_port", 8080, 8080, None),
        ("routing_rules",
         '[{"match": {"headers": [{"name": "Authorization", "value": "Bearer x"}]}}]',
         [{"match": {"headers": [{"name": "Authorization", "value": "********"}]}}],
         "credential header"),
        ("routing_rules", '[{"match": {"headers": [{"name": "X-Env", "value": "prod"}]}}]',
         '[{"match": {"headers": [{"name": "X-Env", "value": "prod"}]}}]', None),
        ("other", {"headers": {"Cookie": "a=b", "Accept": "*/*"}},
         {"headers": {"Cookie": "********", "Accept": "*/*"}}, "credential header"),
    ],
)  # fmt: skip
def test_redact(option: str, value: Any, shown: Any, why: str | None) -> None:
    assert effective.redact(option, value) == (shown, why)


# --- /admin/config: sources ----------------------------------------------------------------------


def test_config_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, m = Config(), management.Management()
    profile = tmp_path / "p.yaml"
    profile.write_text("server:\n  port: 9999\nadmin:\n  token: s3cret\n")
    with taddons.context(cfg, m, acl.Acl()) as tctx:
        monkeypatch.setenv("WAYPOST_METRICS__PORT", "0")
        tctx.options.update(acl_mode="shadow")  # as if --set
        tctx.configure(cfg, waypost_profile=str(profile))
        keys = routes.config_answer()["keys"]
    assert keys["server.port"] == {"value": 9999, "option": "listen_port", "source": "file",
                                   "where": f"{profile}:2"}  # fmt: skip
    assert keys["metrics.port"] == {"value": 0, "option": "metrics_port", "source": "env",
                                    "where": "WAYPOST_METRICS__PORT"}  # fmt: skip
    assert keys["security.acl.mode"] == {"value": "shadow", "option": "acl_mode",
                                         "source": "set", "where": None}  # fmt: skip
    assert keys["metrics.host"]["source"] == "default"
    assert keys["admin.token"]["value"] == "********"


# --- explain -------------------------------------------------------------------------------------


def test_explain_request_validation() -> None:
    with pytest.raises(ValidationError) as e:
        models.ExplainRequest.model_validate({"method": "GET"})
    assert e.value.errors()[0]["loc"] == ("url",)
    with pytest.raises(ValidationError, match="client_ip"):
        models.ExplainRequest.model_validate({"url": "http://a/", "client_ip": "nope"})
    with pytest.raises(ValidationError, match="absolute"):
        models.ExplainRequest.model_validate({"url": "/relative"})
    with pytest.raises(ValidationError, match="host:port"):
        models.ExplainRequest.model_validate({"method": "connect", "url": "example.com"})
    ok = models.ExplainRequest.model_validate({"method": "connect", "url": "example.com:443"})
    assert explain.synthetic_flow(ok).request.port == 443


def _pipeline() -> list[Any]:
    return [hygiene.Hygiene(), acl.Acl(), ratelimit.RateLimit(), filter.Filter(),
            egress.Egress(), contentfilter.ContentFilter(), Router(), Cache()]  # fmt: skip


def _explain(addons: list[Any], **body: Any) -> dict[str, Any]:
    return explain.explain(models.ExplainRequest.model_validate(body), addons)


def test_explain_every_policy_in_order() -> None:
    addons = _pipeline()
    with taddons.context(*addons) as tctx:
        tctx.options.update(
            acl_denied_ips=["203.0.113.0/24"],
            filter_blocked=["ads.example", "*.tracker.example"],
            ratelimit_requests_per_second="1",
            ratelimit_burst=2,
            content_filter_blocked_types=["application/x-evil"],
            content_filter_check_request=True,
            routing_rules=json.dumps(
                [{"name": "api", "match": {"path": "/api"},
                  "forward": {"target": "http://127.0.0.1:9"}}]
            ),
        )  # fmt: skip
        ok = _explain(addons, url="http://93.184.215.14:8000/api/x", client_ip="192.0.2.1")
        assert ok["outcome"] == "allow", ok
        names = [d["addon"] for d in ok["decisions"]]
        assert names == ["hygiene", "acl", "ratelimit", "filter", "egress", "content_filter",
                         "router", "cache"]  # fmt: skip
        by = {d["addon"]: d for d in ok["decisions"]}
        assert by["router"]["rule"] == "api" and by["router"]["decision"] == "route"
        assert by["egress"]["decision"] == "allow"
        assert by["cache"]["decision"] == "lookup"

        private = _explain(addons, url="http://127.0.0.1:8000/", client_ip="192.0.2.1")
        assert private["refused_by"] == "egress"
        by = {d["addon"]: d for d in private["decisions"]}
        assert by["egress"]["rule"] == "block_private"
        named = _explain(addons, url="http://name.example/", client_ip="192.0.2.1")
        assert named["decisions"][4]["decision"] == "resolved at request time"

        blocked = _explain(addons, url="https://x.tracker.example/", client_ip="192.0.2.1")
        assert blocked["outcome"] == "block" and blocked["refused_by"] == "filter"
        assert {"decision": "block", "entry": "*.tracker.example"}.items() <= next(
            d for d in blocked["decisions"] if d["addon"] == "filter"
        ).items()

        tctx.options.update(filter_mode="shadow")
        shadow = _explain(addons, url="https://ads.example/", client_ip="192.0.2.1")
        f = next(d for d in shadow["decisions"] if d["addon"] == "filter")
        assert f["decision"] == "would_block" and f["shadow"] and not f["refuses"]

        denied = _explain(addons, url="https://example.com/", client_ip="203.0.113.9")
        assert denied["refused_by"] == "acl"

        evil = _explain(addons, method="POST", url="https://example.com/",
                        headers={"Content-Type": "application/x-evil"})  # fmt: skip
        c = next(d for d in evil["decisions"] if d["addon"] == "content_filter")
        assert c["decision"] == "block"

        trace = _explain(addons, method="TRACE", url="https://example.com/")
        assert trace["decisions"][0]["decision"] == "block"
        assert trace["decisions"][0]["rule"] == "blocked_method"


def test_explain_rate_limit_is_read_only() -> None:
    rl = ratelimit.RateLimit()
    with taddons.context(rl) as tctx:
        tctx.options.update(ratelimit_requests_per_second="1", ratelimit_burst=1)
        first = _explain([rl], url="https://example.com/", client_ip="192.0.2.7")
        assert first["decisions"][0]["decision"] == "allow"
        assert len(rl.buckets) == 0  # nothing taken
        rl.buckets.take("192.0.2.7", __import__("time").monotonic(), 1.0, 1)
        table = dict(rl.buckets.table)
        for _ in range(2):
            limited = _explain([rl], url="https://example.com/", client_ip="192.0.2.7")
            assert limited["outcome"] == "block"
            assert limited["decisions"][0]["decision"] == "limit"
        assert dict(rl.buckets.table) == table


def test_explain_router_open_breaker() -> None:
    r = Router()
    with taddons.context(r) as tctx:
        tctx.options.update(
            routing_rules=json.dumps(
                [{"name": "api", "match": {"path": "/"},
                  "forward": {"target": "http://127.0.0.1:9"}}]
            )
        )  # fmt: skip
        for b in r.backends.values():
            b.breaker.state = "open"
            b.breaker.opened_at = __import__("time").monotonic()
        found = _explain([r], url="http://service.local/x", listener="reverse")
        d = found["decisions"][0]
        assert d["decision"] == "circuit_open" and d["refuses"]
        assert d["backends"][0]["circuit"] == "open"
        assert next(iter(r.backends.values())).breaker.state == "open"  # untouched


def test_explain_reverse_listener_without_a_matching_rule() -> None:
    r = Router()
    with taddons.context(r) as tctx:
        tctx.options.update(
            routing_rules=json.dumps(
                [{"name": "api", "match": {"path": "/api"},
                  "forward": {"target": "http://127.0.0.1:9"}}]
            )
        )  # fmt: skip
        forward = _explain([r], url="http://service.local/other")["decisions"][0]
        assert forward["decision"] == "pass" and not forward["refuses"]
        reverse = _explain([r], url="http://service.local/other", listener="reverse")
        assert reverse["refused_by"] == "router"
        assert reverse["decisions"][0]["decision"] == "no_route"


def test_explain_command() -> None:
    m, f = management.Management(), filter.Filter()
    with taddons.context(m, f) as tctx:
        tctx.options.update(filter_blocked=["ads.example"])
        out = json.loads(m.explain_command("get", "https://ads.example/", "192.0.2.1"))
        assert out["refused_by"] == "filter"
        with pytest.raises(exceptions.CommandError, match="absolute"):
            m.explain_command("GET", "nowhere")


# --- the app: routes, auth, openapi ---------------------------------------------------------------


@pytest.fixture
async def client() -> Any:
    m = management.Management()
    addons = [m, Config(), *_pipeline()]
    with taddons.context(*addons) as tctx:
        tctx.configure(m, metrics_enabled=False, admin_token="s3cret")
        app = m._make_app()
        async with TestClient(TestServer(app)) as c:
            c.app_under_test = app
            yield c


async def test_routes_need_the_token(client: Any) -> None:
    for method, path in [("GET", "/admin/config"), ("GET", "/admin/version"),
                         ("POST", "/admin/explain"), ("GET", "/admin/openapi.json")]:  # fmt: skip
        assert (await client.request(method, path)).status == 401
        bad = {"Authorization": "Bearer nope"}
        assert (await client.request(method, path, headers=bad)).status == 403
    assert (await client.post("/admin/version", headers=TOKEN)).status == 405
    head = await client.head("/admin/version", headers=TOKEN)
    assert head.status == 200 and await head.read() == b""
    assert (await client.get("/admin/explain", headers=TOKEN)).status == 405
    ctx.options.update(admin_token="")
    assert (await client.get("/admin/version", headers=TOKEN)).status == 404


async def test_version_and_explain_over_http(client: Any) -> None:
    v = await (await client.get("/admin/version", headers=TOKEN)).json()
    assert set(v) == {"waypost", "mitmproxy", "python"}
    resp = await client.post("/admin/explain", headers=TOKEN, json={"method": "GET"})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["code"] == "BAD_REQUEST" and err["fields"][0]["field"] == "url"
    resp = await client.post("/admin/explain", headers=TOKEN, data=b"{not json")
    assert resp.status == 400
    resp = await client.post("/admin/explain", headers=TOKEN, json={"url": "http://a.example/"})
    assert resp.status == 200
    assert (await resp.json())["outcome"] == "allow"


def _served(app: Any) -> set[tuple[str, str]]:
    """(path, method) of every /admin/ route the app serves, its own and the extensions'."""
    served = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith("/admin/"):
            served.add(path)
    for addon in ctx.master.addons.lookup.values():
        routes = getattr(addon, "management_routes", None)
        if routes is not None:
            served |= {p for p in routes() if p.startswith("/admin/")}
    return served


async def test_openapi_covers_every_route_and_validates(client: Any) -> None:
    validate = spec_validator()
    doc = await (await client.get("/admin/openapi.json", headers=TOKEN)).json()
    validate(doc)
    served = _served(client.app_under_test)
    assert {"/admin/reload", "/admin/config", "/admin/explain", "/admin/backends",
            "/admin/cache", "/admin/cache/stats"} <= served  # fmt: skip
    # A route serving any last segment (`/admin/bans/*`) is a templated path in the document.
    templated = {re.sub(r"\{[^/]+\}$", "*", path) for path in doc["paths"]}
    assert served <= set(doc["paths"]) | templated
    assert "/admin/bans/*" in served and "/admin/bans/{ip}" in doc["paths"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_every_example_validates() -> None:
    doc = openapi.document()
    named: dict[str, type[BaseModel]] = {m.__name__: m for m in openapi._MODELS}
    seen = 0
    for name, schema in doc["components"]["schemas"].items():
        for example in schema.get("examples", []):
            named[name].model_validate(example)
            seen += 1
    for ops in doc["paths"].values():
        for op in ops.values():
            for answer in op["responses"].values():
                media = answer["content"]["application/json"]
                if "example" in media and "$ref" in media["schema"]:
                    named[media["schema"]["$ref"].rsplit("/", 1)[1]].model_validate(
                        media["example"]
                    )
                    seen += 1
    assert seen >= 6


def test_instance_answers_one_document_as_is() -> None:
    from addons.supervisor.instance import Answer, merge_admin

    doc = openapi.document()
    status, body, _ = merge_admin("/admin/openapi.json", [Answer(0, 200, doc), Answer(1, 200, doc)])
    assert status == 200 and body == doc
    v = {"waypost": "1", "mitmproxy": "11", "python": "3.11.2"}
    other = v | {"waypost": "2"}
    status, body, _ = merge_admin("/admin/version", [Answer(0, 200, v), Answer(1, 200, other)])
    assert body["mitmproxy"] == "11" and len(body["workers"]) == 2  # a mid-upgrade mix shows


def test_explain_cli_endpoint_only_for_its_path() -> None:
    from mitmproxy.proxy import mode_specs

    from addons.clirun.addon import Cli

    cli = Cli()
    with taddons.context(cli):
        cli.listen_addrs = [("127.0.0.1", 1)]
        req = models.ExplainRequest.model_validate(
            {"method": "POST", "url": "http://backend.example/cli/execute", "listener": "reverse"}
        )
        flow = explain.synthetic_flow(req)
        assert isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode)
        assert cli.explain(flow) == {"addon": "cli", "decision": "cli", "rule": "/cli/execute",
                                     "backend": "cli"}  # fmt: skip
        other = _explain([cli], method="POST", url="http://backend.example/cli/execute")
        assert other["decisions"] == []  # forward, not addressed to the proxy
