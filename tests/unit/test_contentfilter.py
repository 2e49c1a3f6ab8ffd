"""Content-type filter: pattern parsing and matching tables, and the addon's hooks."""

from __future__ import annotations

import json

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow

from addons import contentfilter as cf
from addons.kernel.record import record

PATTERNS = ["application/x-msdownload", "Video/*", r"/application/(x-)?zip(-compressed)?/"]


@pytest.mark.parametrize(
    "content_type, rule",
    [
        ("application/x-msdownload", "application/x-msdownload"),
        ("Application/X-MSDownload; name=a.exe", "application/x-msdownload"),
        ("video/mp4", "Video/*"),
        ("VIDEO/webm;codecs=vp9", "Video/*"),
        ("application/zip", r"/application/(x-)?zip(-compressed)?/"),
        ("application/x-zip-compressed", r"/application/(x-)?zip(-compressed)?/"),
        ("application/zipper", None),  # regexes match the whole media type
        ("text/html", None),
        ("videos/mp4", None),
        ("", None),
        (None, None),
    ],
)
def test_match(content_type: str | None, rule: str | None) -> None:
    assert cf.match(cf.parse_types(PATTERNS), content_type) == rule


@pytest.mark.parametrize("spec", ["text", "text/", "/", "*/*", "text/ht*", "te xt/html", "/(/"])
def test_parse_types_refuses(spec: str) -> None:
    with pytest.raises(ValueError):
        cf.parse_types([spec])


def test_empty_patterns_are_falsy() -> None:
    assert not cf.parse_types([])
    assert cf.parse_types(["text/html"])


def _response_flow(ctype: str) -> http.HTTPFlow:
    f = tflow.tflow(resp=True)
    f.response.headers["content-type"] = ctype
    return f


def test_response_is_replaced_before_the_body_and_origin_bytes_dropped() -> None:
    addon = cf.ContentFilter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, content_filter_blocked_types=PATTERNS)
        f = _response_flow("video/mp4")
        addon.responseheaders(f)
        assert f.response.status_code == 403
        body = json.loads(f.response.content)["error"]
        assert (body["code"], body["rule"]) == ("CONTENT_TYPE_BLOCKED", "Video/*")
        stream = f.response.stream
        assert callable(stream)
        # Streamed: our body goes out with the first origin chunk, origin bytes never do.
        first = stream(b"origin bytes")
        assert json.loads(first)["error"]["code"] == "CONTENT_TYPE_BLOCKED"
        assert stream(b"more origin bytes") == b""
        assert stream(b"") == b""
        assert record(f)["blocked_by"] == "content_filter"


def test_response_without_a_body_gets_the_403_body_back() -> None:
    addon = cf.ContentFilter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, content_filter_blocked_types=["video/*"])
        f = _response_flow("video/mp4")
        addon.responseheaders(f)
        expected = f.response.content
        f.response.data.content = b""  # what mitmproxy does when the origin sent no body
        addon.response(f)
        assert f.response.content == expected
        assert f.response.headers["content-length"] == str(len(expected))


def test_allowed_type_and_shadow_mode_pass() -> None:
    addon = cf.ContentFilter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, content_filter_blocked_types=["video/*"])
        f = _response_flow("text/html")
        addon.responseheaders(f)
        assert f.response.status_code == 200
        tctx.configure(addon, content_filter_mode="shadow")
        g = _response_flow("video/mp4")
        addon.responseheaders(g)
        assert g.response.status_code == 200
        assert record(g)["shadow"] == ["content_filter:video/*"]


def test_request_content_type_only_when_asked() -> None:
    addon = cf.ContentFilter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, content_filter_blocked_types=["application/x-msdownload"])
        f = tflow.tflow()
        f.request.headers["content-type"] = "application/x-msdownload"
        addon.requestheaders(f)
        assert f.response is None
        tctx.configure(addon, content_filter_check_request=True)
        addon.requestheaders(f)
        assert f.response is not None and f.response.status_code == 403


def test_invalid_regex_is_an_option_error() -> None:
    addon = cf.ContentFilter()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="content_filter_blocked_types"):
            tctx.configure(addon, content_filter_blocked_types=["/[/"])


def test_response_set_in_request_is_judged_in_response() -> None:
    # A cache hit is answered in `request`: responseheaders never runs for it.
    addon = cf.ContentFilter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, content_filter_blocked_types=["video/*"])
        f = _response_flow("video/mp4")
        addon.response(f)
        assert f.response.status_code == 403
        ok = _response_flow("video/mp4")
        addon.responseheaders(ok)  # judged once already (blocked)
        first = ok.response
        addon.response(ok)
        assert ok.response is first
        own = _response_flow("video/mp4")
        record(own)["error_code"] = "BACKEND_UNREACHABLE"
        addon.response(own)
        assert own.response.status_code == 200
