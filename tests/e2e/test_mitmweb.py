"""What mitmweb shows, through a real bundle: refused flows (plain and CONNECT) carry the mark
and comment of the decision that refused them, as saved by `save_stream_file`."""

from __future__ import annotations

from pathlib import Path

from mitmproxy import io

from tests.conftest import raw_request, status_of


def test_refusals_are_marked_and_commented_in_the_saved_flows(proxy_factory, tmp_path: Path):
    saved = tmp_path / "flows.mitm"
    p = proxy_factory(
        options={"filter_blocked": ["*.ads.test"], "save_stream_file": str(saved)},
    )
    plain = b"GET http://x.ads.test/a HTTP/1.1\r\nHost: x.ads.test\r\n\r\n"
    assert status_of(raw_request(p.port, plain)) == 403
    tunnel = b"CONNECT y.ads.test:443 HTTP/1.1\r\nHost: y.ads.test:443\r\n\r\n"
    assert status_of(raw_request(p.port, tunnel)) == 403
    assert p.stop() == 0
    with saved.open("rb") as f:
        flows = {fl.request.method: fl for fl in io.FlowReader(f).stream()}
    assert flows.keys() == {"GET", "CONNECT"}
    for fl in flows.values():
        assert fl.response.status_code == 403
        assert fl.marked == ":no_entry:"
        assert fl.comment == "waypost filter block rule=*.ads.test"
