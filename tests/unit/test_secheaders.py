"""Security headers: option parsing and header merging as tables, the addon through tflow."""

from __future__ import annotations

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from addons import errors, forwarding, secheaders


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"secheaders_hsts": "includeSubDomains"}, "max-age"),
        ({"secheaders_hsts": "max-age=1\r\nX-Evil: 1"}, "control"),
        ({"secheaders_content_type_options": "sniff"}, "nosniff"),
        ({"secheaders_frame_options": "ALLOW-FROM https://x"}, "DENY, SAMEORIGIN"),
        ({"secheaders_content_security_policy": "default-src 'self'\n"}, "control"),
    ],
)
def test_option_errors(options: dict, problem: str) -> None:
    a = secheaders.SecHeaders()
    with taddons.context(a) as tctx:
        with pytest.raises(exceptions.OptionsError, match=problem):
            tctx.configure(a, **options)


ADD = secheaders.parse_headers("", "nosniff", "DENY", "default-src 'self'")[1]


@pytest.mark.parametrize(
    "fields, override, expected",
    [
        (
            (),
            False,
            (
                (b"X-Content-Type-Options", b"nosniff"),
                (b"X-Frame-Options", b"DENY"),
                (b"Content-Security-Policy", b"default-src 'self'"),
            ),
        ),
        (  # the backend's own values are kept
            ((b"x-frame-options", b"SAMEORIGIN"), (b"Content-Type", b"text/html")),
            False,
            (
                (b"x-frame-options", b"SAMEORIGIN"),
                (b"Content-Type", b"text/html"),
                (b"X-Content-Type-Options", b"nosniff"),
                (b"Content-Security-Policy", b"default-src 'self'"),
            ),
        ),
        (  # ... unless override
            ((b"x-frame-options", b"SAMEORIGIN"), (b"Content-Type", b"text/html")),
            True,
            (
                (b"Content-Type", b"text/html"),
                (b"X-Content-Type-Options", b"nosniff"),
                (b"X-Frame-Options", b"DENY"),
                (b"Content-Security-Policy", b"default-src 'self'"),
            ),
        ),
    ],
)
def test_apply(fields: tuple, override: bool, expected: tuple) -> None:
    assert secheaders.apply(fields, ADD, override) == expected


def test_nothing_to_change() -> None:
    present = tuple((h.name, b"x") for h in ADD)
    assert secheaders.apply(present, ADD, False) is None


def response_flow(tls: bool, peer: str = "192.0.2.1") -> tflow.HTTPFlow:
    f = tflow.tflow(resp=True)
    f.client_conn.tls = tls
    f.client_conn.peername = (peer, 1234)
    return f


def test_hsts_only_over_https() -> None:
    a = secheaders.SecHeaders()
    with taddons.context(a) as tctx:
        tctx.configure(a, secheaders_enabled=True)
        f = response_flow(tls=False)
        a.responseheaders(f)
        assert "strict-transport-security" not in f.response.headers
        assert f.response.headers["x-content-type-options"] == "nosniff"
        assert f.response.headers["x-frame-options"] == "DENY"
        assert "content-security-policy" not in f.response.headers  # off by default
        f = response_flow(tls=True)
        a.responseheaders(f)
        assert f.response.headers["strict-transport-security"] == (
            "max-age=31536000; includeSubDomains"
        )


def test_hsts_through_a_trusted_proxy_only() -> None:
    a = secheaders.SecHeaders()
    fwd = forwarding.Forwarding()
    with taddons.context(a, fwd) as tctx:
        tctx.configure(fwd, forwarding_trusted_proxies=["10.0.0.0/8"])
        tctx.configure(a, secheaders_enabled=True)
        for peer, want in (("10.0.0.1", True), ("192.0.2.1", False)):
            f = response_flow(tls=False, peer=peer)
            f.request.headers["X-Forwarded-Proto"] = "https"
            a.responseheaders(f)
            assert ("strict-transport-security" in f.response.headers) == want, peer


def test_off_by_default_and_each_header_can_be_off() -> None:
    a = secheaders.SecHeaders()
    with taddons.context(a) as tctx:
        f = response_flow(tls=True)
        a.responseheaders(f)
        assert "x-frame-options" not in f.response.headers
        tctx.configure(a, secheaders_enabled=True, secheaders_frame_options="", secheaders_hsts="")
        f = response_flow(tls=True)
        a.responseheaders(f)
        assert "x-frame-options" not in f.response.headers
        assert "strict-transport-security" not in f.response.headers
        assert f.response.headers["x-content-type-options"] == "nosniff"


def test_proxy_made_answers_get_them_in_response() -> None:
    a = secheaders.SecHeaders()
    with taddons.context(a) as tctx:
        tctx.configure(a, secheaders_enabled=True)
        f = tflow.tflow()
        f.response = errors.make("ACCESS_DENIED", "no", f)
        a.response(f)
        assert f.response.headers["x-content-type-options"] == "nosniff"
        c = tflow.tflow(resp=True)
        c.request.method = "CONNECT"
        a.responseheaders(c)
        assert "x-frame-options" not in c.response.headers
