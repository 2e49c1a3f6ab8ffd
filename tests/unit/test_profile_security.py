"""The security.acl, security.rate_limiting and security.headers profile sections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from addons import ratelimit, schema
from addons.ratelimiting import bucket

SECTIONS = """\
security:
  acl:
    allowed_ips: [10.0.0.0/8, "::ffff:192.168.0.0/112"]
    denied_ips: [10.6.6.0/24]
    mode: shadow
  rate_limiting:
    requests_per_second: 2.5
    burst: 10
    exempt: [10.9.0.0/16]
    max_connections_per_ip: 50
    rules:
      - {id: search, host: "*.example.com", path: /search, requests_per_second: 1, mode: shadow}
      - {id: static, path: /static/, requests_per_second: 0}
  headers:
    enabled: true
    content_security_policy: "default-src 'self'"
    override: true
"""


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> schema.Loaded:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return schema.load(p, env or {})


def test_sections_become_options(tmp_path: Path) -> None:
    opts = schema.to_options(load(tmp_path, SECTIONS).profile)
    assert opts["acl_allowed_ips"] == ["10.0.0.0/8", "::ffff:c0a8:0/112"]
    assert opts["acl_mode"] == "shadow"
    assert opts["ratelimit_requests_per_second"] == "2.5"
    assert opts["ratelimit_burst"] == 10
    assert opts["ratelimit_max_connections_per_ip"] == 50
    rules = json.loads(opts["ratelimit_rules"])
    assert rules[0] == {
        "id": "search",
        "host": "*.example.com",
        "path": "/search",
        "requests_per_second": 1.0,
        "burst": 0,
        "mode": "shadow",
    }
    # the addon accepts what the profile produces
    limits = bucket.parse_rules(opts["ratelimit_rules"], "enforce")
    assert [r.id for r in limits] == ["search", "static"]
    assert opts["secheaders_enabled"] is True
    assert opts["secheaders_content_security_policy"] == "default-src 'self'"
    assert opts["secheaders_hsts"] == "max-age=31536000; includeSubDomains"


def test_defaults_turn_everything_off() -> None:
    opts = schema.to_options(schema.Profile())
    assert opts["acl_allowed_ips"] == [] and opts["acl_denied_ips"] == []
    assert opts["ratelimit_requests_per_second"] == "0"
    assert opts["ratelimit_rules"] == ""
    assert opts["secheaders_enabled"] is False


def test_rate_limit_rps_env(tmp_path: Path) -> None:
    loaded = load(tmp_path, SECTIONS, {"RATE_LIMIT_RPS": "100"})
    assert loaded.profile.security.rate_limiting.requests_per_second == 100
    with pytest.raises(schema.ProfileError, match="environment variable RATE_LIMIT_RPS"):
        load(tmp_path, SECTIONS, {"RATE_LIMIT_RPS": "lots"})


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("security: {acl: {denied_ips: [10.0.0.0/33]}}", "p.yaml:1: security.acl.denied_ips.0"),
        ("security: {acl: {mode: audit}}", "security.acl.mode"),
        (
            "security:\n  rate_limiting:\n    rules:\n      - {id: x, requests_per_second: 1}\n",
            "p.yaml:4: security.rate_limiting.rules.0: a rule needs a host or a path",
        ),
        (
            "security:\n  rate_limiting:\n    rules:\n"
            "      - {id: x, host: a, requests_per_second: 1}\n"
            "      - {id: x, host: b, requests_per_second: 1}\n",
            "rule ids must be unique",
        ),
        (
            "security:\n  rate_limiting:\n    rules:\n"
            "      - {id: x, host: 'a..b', requests_per_second: 1}\n",
            "p.yaml:4: security.rate_limiting.rules.0.host: 'a..b' is not a host pattern",
        ),
        (
            "security:\n  rate_limiting:\n    rules:\n"
            "      - {id: x, host: 'api.example.com:8080', requests_per_second: 1}\n",
            "p.yaml:4: security.rate_limiting.rules.0.host:",
        ),
        (  # the rate limiter has no `*` rule host: the default limit is that
            "security:\n  rate_limiting:\n    rules:\n"
            "      - {id: x, host: '*', requests_per_second: 1}\n",
            "p.yaml:4: security.rate_limiting.rules.0.host:",
        ),
        ("security: {rate_limiting: {requests_per_second: -1}}", "requests_per_second"),
        ("security: {rate_limiting: {max_clients: 0}}", "max_clients"),
        ("security: {headers: {hsts: includeSubDomains}}", "max-age"),
        ("security: {headers: {frame_options: ALLOWALL}}", "frame_options"),
    ],
)
def test_errors_name_the_line(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(schema.ProfileError) as e:
        load(tmp_path, text)
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "host, key",
    [
        ("*.Bücher.example", "shop.xn--bcher-kva.example"),
        ("API.example.com.", "api.example.com"),
        ("10.0.0.1", "10.0.0.1"),
    ],
)
def test_rule_hosts_the_profile_accepts_the_rate_limiter_accepts(
    tmp_path: Path, host: str, key: str
) -> None:
    text = (
        "security:\n  rate_limiting:\n    rules:\n"
        f"      - {{id: x, host: '{host}', requests_per_second: 1}}\n"
    )
    opts = schema.to_options(load(tmp_path, text).profile)
    (rule,) = bucket.parse_rules(opts["ratelimit_rules"], "enforce")
    assert bucket.match([rule], key, "/") is rule


def test_bundle_addons_accept_the_profile_options(tmp_path: Path) -> None:
    from addons import acl, forwarding, secheaders

    opts = schema.to_options(load(tmp_path, SECTIONS).profile)
    addons = [forwarding.Forwarding(), acl.Acl(), ratelimit.RateLimit(), secheaders.SecHeaders()]
    with taddons.context(*addons) as tctx:
        mine = {
            k: v
            for k, v in opts.items()
            if k.startswith(("acl_", "ratelimit_", "secheaders_", "forwarding_"))
        }
        tctx.options.update(**mine)
        assert addons[2].default.rate == 2.5
