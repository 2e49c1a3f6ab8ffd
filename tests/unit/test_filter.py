"""Domain filter: list formats, decisions, and the addon (names, patterns and the index:
tests/unit/test_kernel_hosts.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from addons import filter as flt
from addons import metrics
from addons.kernel import hosts
from addons.kernel.hosts import HostIndex, Pattern
from addons.kernel.record import record

# --- list lines ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, entries",
    [
        ("", None),
        ("   ", None),
        ("# comment", None),
        ("! AdBlock comment", None),
        ("[Adblock Plus 2.0]", None),
        ("ads.example.com", [Pattern("ads.example.com", False)]),
        ("*.ads.example.com", [Pattern("ads.example.com", True)]),
        ("ads.example.com   # why", [Pattern("ads.example.com", False)]),
        ("0.0.0.0 ads.example.com", [Pattern("ads.example.com", False)]),
        (
            "127.0.0.1\tA.example B.example",
            [Pattern("a.example", False), Pattern("b.example", False)],
        ),
        ("::1 ip6-localhost ip6-loopback", []),
        ("127.0.0.1 localhost", []),
        ("0.0.0.0 x.example # tracker", [Pattern("x.example", False)]),
        (
            "||ads.example.com^",
            [Pattern("ads.example.com", False), Pattern("ads.example.com", True)],
        ),
    ],
)
def test_parse_line(line: str, entries: list[Pattern] | None) -> None:
    assert flt.parse_line(line) == entries


@pytest.mark.parametrize(
    "line",
    [
        "||ads.example.com^$third-party",  # options change the meaning
        "||ads.example.com/path^",
        "||ads.example",  # a prefix, not a domain
        "@@||ok.example^",  # exceptions are not supported
        "example.com##.banner",  # element hiding, not `example.com` with a comment
        "/banner/*/img^",
        "not a hosts line",
        "0.0.0.0 bad_name!",
        "http://example.com/",
    ],
)
def test_parse_line_junk(line: str) -> None:
    with pytest.raises(ValueError):
        flt.parse_line(line)


def test_parse_list_counts_and_never_fails() -> None:
    lines = [
        "# hosts",
        "127.0.0.1 localhost",
        "0.0.0.0 a.example",
        "garbage line here",
        "",
        "||b.example^",
        "example.com##.ad",
        "c.example",
    ]
    entries: list[Pattern] = []
    stats = flt.parse_list(lines, entries.append)
    assert [e.name for e in entries] == ["a.example", "b.example", "b.example", "c.example"]
    assert stats == flt.ListStats(entries=4, comments=3, junk=2, junk_lines=(4, 7))


def index(*patterns: str, rule: str | None = None) -> HostIndex[str]:
    return hosts.build_index(hosts.parse_patterns(patterns), rule)


# --- decisions --------------------------------------------------------------------------------


def rules(list_mode: str = "blocklist", blocked=(), allowed=(), **kw) -> flt.Rules:
    def sources(specs):
        return tuple(
            s if isinstance(s, flt.Source) else flt.Source(None, "enforce", index(*s))
            for s in specs
        )

    return flt.Rules(list_mode=list_mode, blocked=sources(blocked), allowed=sources(allowed), **kw)


@pytest.mark.parametrize(
    "list_mode, host, rule",
    [
        ("blocklist", "x.ads.example", "*.ads.example"),
        ("blocklist", "ok.ads.example", None),  # allowed entries are exceptions to a blocklist
        ("blocklist", "news.example", None),
        ("allowlist", "news.example", "allowlist"),
        ("allowlist", "x.corp.example", None),
        ("allowlist", "bad.corp.example", None),  # in allowlist mode blocked entries do nothing
        ("mixed", "x.corp.example", None),
        ("mixed", "bad.corp.example", "bad.corp.example"),  # blocked carve-outs of the allowlist
        ("mixed", "news.example", "allowlist"),
    ],
)
def test_decide_modes(list_mode: str, host: str, rule: str | None) -> None:
    r = rules(
        list_mode,
        blocked=[("*.ads.example", "bad.corp.example")],
        allowed=[("ok.ads.example", "*.corp.example")],
    )
    got = flt.decide(r, host)
    assert (got.rule if got else None) == rule


@pytest.mark.parametrize(
    "ip_literals, host, rule",
    [
        ("allow", "192.0.2.7", None),
        ("deny", "192.0.2.9", "ip_literals"),
        ("deny", "2001:db8::1", "ip_literals"),
        ("check", "192.0.2.7", "192.0.2.7"),
        ("check", "192.0.2.9", "*.2.0.192.in-addr.arpa"),
        ("check", "198.51.100.1", None),
        ("check", "127.1", None),
        ("deny", "example.com", None),
    ],
)
def test_decide_ip_literals(ip_literals: str, host: str, rule: str | None) -> None:
    r = rules(blocked=[("192.0.2.7", "*.2.0.192.in-addr.arpa")], ip_literals=ip_literals)
    got = flt.decide(r, host)
    assert (got.rule if got else None) == rule


def test_per_rule_mode_comes_from_the_source() -> None:
    shadowed = flt.Source("ads", "shadow", index("ads.example", rule="ads"))
    r = rules(blocked=[shadowed, ("bad.example",)])
    assert flt.decide(r, "ads.example") == flt.Verdict("ads", "ads.example", "shadow")
    assert flt.decide(r, "bad.example") == flt.Verdict("bad.example", "bad.example", "enforce")


# --- file specs and loading -------------------------------------------------------------------


def test_parse_file_specs() -> None:
    specs = flt.parse_file_specs(
        '["lists/ads.txt", {"path": "x/ok.list", "list": "allowed", "mode": "shadow", "id": "ok"}]'
    )
    assert [(flt.rule_id(s), s.list, s.mode) for s in specs] == [
        ("ads", "blocked", None),
        ("ok", "allowed", "shadow"),
    ]
    assert flt.parse_file_specs("") == ()


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "expected a JSON list"),
        ('[{"path": "a", "lst": "x"}]', "lst"),
        ('[{"path": "a", "list": "denied"}]', "list"),
        ('["a/x.txt", "b/x.txt"]', "distinct ids"),
    ],
)
def test_parse_file_specs_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        flt.parse_file_specs(text)


def test_load_list_bad_files(tmp_path: Path) -> None:
    with pytest.raises(flt.BadList, match="cannot read"):
        flt.load_list(str(tmp_path / "missing.txt"), "x")
    junk = tmp_path / "junk.txt"
    junk.write_bytes(b"\x00\x01 binary\n<html>not a list</html>\n")
    with pytest.raises(flt.BadList, match="no usable entry"):
        flt.load_list(str(junk), "x")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    assert flt.load_list(str(empty), "x").stats.entries == 0


# --- the addon --------------------------------------------------------------------------------


def count(decision: str, rule: str) -> float:
    labels = {"policy": "filter", "decision": decision, "rule": rule}
    return metrics.REGISTRY.get_sample_value("policy_decisions_total", labels) or 0.0


def test_plain_http_decides_on_the_dialled_host_not_the_host_header() -> None:
    addon = flt.Filter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, filter_blocked=["*.ads.example"])
        f = tflow.tflow()
        f.request.host = "x.ads.example"
        f.request.headers["Host"] = "allowed.example"
        before = count("block", "*.ads.example")
        addon.requestheaders(f)
        assert f.response is not None and f.response.status_code == 403
        err = json.loads(f.response.content)["error"]
        assert err["code"] == "DOMAIN_BLOCKED"
        assert err["rule"] == "*.ads.example"
        assert "*.ads.example" in err["message"]
        assert count("block", "*.ads.example") == before + 1
        assert record(f)["blocked_by"] == "filter"

        ok = tflow.tflow()
        ok.request.host = "allowed.example"
        ok.request.headers["Host"] = "x.ads.example"
        addon.requestheaders(ok)
        assert ok.response is None


def test_connect_is_decided_on_its_authority() -> None:
    addon = flt.Filter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, filter_list_mode="allowlist", filter_allowed=["*.corp.example"])
        f = tflow.tflow()
        f.request.method = "CONNECT"
        f.request.host = "evil.example"
        addon.http_connect(f)
        assert f.response is not None and f.response.status_code == 403
        assert json.loads(f.response.content)["error"]["rule"] == "allowlist"
        g = tflow.tflow()
        g.request.method = "CONNECT"
        g.request.host = "git.corp.example"
        addon.http_connect(g)
        assert g.response is None


def test_shadow_mode_passes_and_records(caplog: pytest.LogCaptureFixture) -> None:
    addon = flt.Filter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, filter_blocked=["shadow.example"], filter_mode="shadow")
        f = tflow.tflow()
        f.request.host = "shadow.example"
        before = count("would_block", "shadow.example")
        with caplog.at_level(logging.WARNING, logger="waypost.audit"):
            addon.requestheaders(f)
        assert f.response is None
        assert record(f)["shadow"] == ["filter:shadow.example"]
        assert count("would_block", "shadow.example") == before + 1
        assert caplog.records[-1].waypost["decision"] == "would_block"


def test_custom_response_body_and_local_flows() -> None:
    addon = flt.Filter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, filter_blocked=["x.example"], filter_response_body="Nope.")
        f = tflow.tflow()
        f.request.host = "x.example"
        addon.requestheaders(f)
        assert json.loads(f.response.content)["error"]["message"] == "Nope."
        local = tflow.tflow()
        local.request.host = "x.example"
        record(local)["local"] = "cli"
        addon.requestheaders(local)
        assert local.response is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"filter_blocked": ["a*.example"]}, "filter_blocked/filter_allowed"),
        ({"filter_files": "[1]"}, "filter_files"),
        ({"filter_files": '["/nonexistent/list.txt"]'}, "cannot read /nonexistent/list.txt"),
        ({"filter_reload_interval": "soon"}, "filter_reload_interval"),
        ({"filter_reload_interval": "0s"}, "more than 0s"),
    ],
)
def test_invalid_options(options: dict, message: str) -> None:
    addon = flt.Filter()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(addon, **options)


def _touch_later(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


async def test_file_reload_swaps_atomically_and_keeps_the_old_list_when_bad(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lst = tmp_path / "ads.txt"
    lst.write_text("0.0.0.0 one.example\n")
    addon = flt.Filter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, filter_files=json.dumps([str(lst)]))
        assert flt.decide(addon.rules, "one.example") == flt.Verdict(
            "ads", "one.example", "enforce"
        )
        addon._running = True

        _touch_later(lst, "||two.example^\n")
        await addon.poll()  # the change is seen ...
        assert flt.decide(addon.rules, "one.example") is not None
        await addon.poll()  # ... and read once it has settled
        assert flt.decide(addon.rules, "one.example") is None
        assert flt.decide(addon.rules, "x.two.example") is not None

        _touch_later(lst, "<html>oops</html>\n")
        with caplog.at_level(logging.WARNING, logger="waypost.filter"):
            await addon.poll()
            await addon.poll()
        assert flt.decide(addon.rules, "x.two.example") is not None
        assert "keeping the list loaded before" in caplog.text
        assert addon.readiness_check()[1]["lists"]["ads"]["error"].endswith("(first at lines 1)")

        lst.unlink()
        await addon.poll()
        assert flt.decide(addon.rules, "x.two.example") is not None


async def test_watcher_task_starts_and_stops(tmp_path: Path) -> None:
    addon = flt.Filter()
    with taddons.context(addon):
        addon.running()
        (task,) = addon._tasks
        addon.done()
        await asyncio.sleep(0)
        assert task.cancelled() or task.done()


# --- the profile section ----------------------------------------------------------------------


def test_profile_section_becomes_the_flat_options(tmp_path: Path) -> None:
    from addons import schema

    path = tmp_path / "p.yaml"
    path.write_text(
        "security:\n"
        "  filtering:\n"
        "    mode: shadow\n"
        "    list_mode: mixed\n"
        "    domains:\n"
        "      blocked: ['*.ads.example']\n"
        "      files: [lists/a.txt, {path: lists/b.txt, id: bee, list: allowed, mode: enforce}]\n"
        "    ip_literals: deny\n"
        "    reload_interval: 500ms\n"
        "    response: {body: No.}\n"
        "  content_filtering: {blocked_types: [video/*], check_request: true}\n"
    )
    opts = schema.to_options(schema.load(path, {}).profile)
    assert opts["filter_mode"] == "shadow"
    assert opts["filter_list_mode"] == "mixed"
    assert opts["filter_blocked"] == ["*.ads.example"]
    assert json.loads(opts["filter_files"]) == [
        {"path": "lists/a.txt", "list": "blocked"},
        {"path": "lists/b.txt", "id": "bee", "list": "allowed", "mode": "enforce"},
    ]
    assert [flt.rule_id(s) for s in flt.parse_file_specs(opts["filter_files"])] == ["a", "bee"]
    assert opts["filter_ip_literals"] == "deny"
    assert opts["filter_reload_interval"] == "500ms"
    assert opts["filter_response_body"] == "No."
    assert opts["content_filter_blocked_types"] == ["video/*"]
    assert opts["content_filter_check_request"] is True


def test_profile_reads_a_list_mode_in_mode_as_the_requirements_do(tmp_path: Path) -> None:
    # The product requirements write the list mode as `mode`; Waypost's `mode` stays enforce.
    from addons import schema

    path = tmp_path / "p.yaml"
    path.write_text("security:\n  filtering:\n    mode: allowlist\n")
    opts = schema.to_options(schema.load(path, {}).profile)
    assert (opts["filter_list_mode"], opts["filter_mode"]) == ("allowlist", "enforce")
    path.write_text("security:\n  filtering:\n    mode: allowlist\n    list_mode: mixed\n")
    with pytest.raises(schema.ProfileError, match=r"p\.yaml:2: .*list_mode disagree"):
        schema.load(path, {})
