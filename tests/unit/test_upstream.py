"""Unit tests: the patch and the hooks (the error table is errors.classify, in test_errors)."""

from __future__ import annotations

import json

import h2.config
import h2.connection
import h2.events
import pytest
from mitmproxy import exceptions, http, version
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import ResponseProtocolError, _http1, _http2
from mitmproxy.test import taddons, tflow

from addons import upstream
from addons.kernel import patching
from addons.upstream import event_status


def test_event_status_int_codes_of_mitmproxy_11() -> None:
    assert event_status(502) == 502
    assert event_status(413) == 413
    assert event_status(444) is None  # NO_RESPONSE


@pytest.mark.skipif(not version.VERSION.startswith("12."), reason="ErrorCode is mitmproxy 12")
def test_event_status_error_codes_of_mitmproxy_12() -> None:
    from mitmproxy.proxy.layers.http import ErrorCode  # type: ignore[attr-defined]

    assert event_status(ErrorCode.CONNECT_FAILED) == 502
    assert event_status(ErrorCode.REQUEST_TOO_LARGE) == 413
    assert event_status(ErrorCode.DESTINATION_UNKNOWN) == 400
    assert event_status(ErrorCode.KILL) is None


def _protocol_error(message: str, status: int) -> ResponseProtocolError:
    if version.VERSION.startswith("11."):
        return ResponseProtocolError(1, message, status)
    from mitmproxy.proxy.layers.http import ErrorCode  # type: ignore[attr-defined]

    code = {502: ErrorCode.CONNECT_FAILED, 413: ErrorCode.REQUEST_TOO_LARGE}[status]
    return ResponseProtocolError(1, message, code)


def test_patch_is_idempotent_and_undone() -> None:
    original_send = _http1.Http1Server.send
    original_make = _http1.make_error_response
    addon = upstream.Upstream()
    with taddons.context(addon):
        assert upstream.install_patch()
        assert upstream.install_patch()  # a script reload installs again: no double wrapper
        assert _http1.Http1Server.send is upstream._send
        assert upstream._send.__waypost_wrapped__ is original_send  # type: ignore[attr-defined]
        body = _http1.make_error_response(400, "bad")
        assert b"application/json" in body and b'"BAD_REQUEST"' in body
        addon.done()
    assert _http1.Http1Server.send is original_send
    assert _http1.make_error_response is original_make


def test_unchecked_version_is_left_alone(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setattr(patching.version, "VERSION", "99.0.0")
    original = _http1.Http1Server.send
    assert not upstream.install_patch()
    assert _http1.Http1Server.send is original
    assert "not a version Waypost checked" in caplog.text


def test_http1_server_sends_json_with_the_flows_request_id() -> None:
    addon = upstream.Upstream()
    with taddons.context(addon):
        upstream.install_patch()
        try:
            f = tflow.tflow()
            f.request.headers["X-Request-ID"] = "rid-42"
            f.error = tflow.terr("[Errno 111] Connect call failed ('127.0.0.1', 9)")
            addon.error(f)
            assert f.metadata["waypost"]["backend_error"] == "connection_refused"

            server = _http1.Http1Server.__new__(_http1.Http1Server)
            server.conn = f.client_conn
            server.conn.state = ConnectionState.OPEN
            server.request = f.request
            server.response = None
            cmds = list(server.send(_protocol_error("[Errno 111] refused", 502)))
            assert isinstance(cmds[0], commands.SendData)
            assert isinstance(cmds[1], commands.CloseConnection)
            head, _, body = cmds[0].data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 502 Bad Gateway")
            assert b"X-Request-ID: rid-42" in head
            err = json.loads(body)["error"]
            assert (err["code"], err["request_id"]) == ("BACKEND_UNREACHABLE", "rid-42")
            assert f.metadata["waypost"]["error_code"] == "BACKEND_UNREACHABLE"
        finally:
            addon.done()


def test_h2_patch_is_installed_and_undone() -> None:
    original = _http2.Http2Server._handle_event
    addon = upstream.Upstream()
    with taddons.context(addon):
        assert upstream.install_patch()
        assert _http2.Http2Server._handle_event is upstream._h2_handle_event
        addon.done()
    assert _http2.Http2Server._handle_event is original


def _h2_exchange(
    tctx: taddons.context, f: tflow.HTTPFlow, error: ResponseProtocolError
) -> list[h2.events.Event]:
    """An HTTP/2 client's request on stream 1, the server's `error` for it, what the client
    then receives."""
    server = _http2.Http2Server(Context(f.client_conn, tctx.options))
    server.h2_conn.initiate_connection()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.receive_data(server.h2_conn.data_to_send())
    request = [(":method", "GET"), (":scheme", "https"), (":authority", "x"), (":path", "/")]
    client.send_headers(1, request, end_stream=True)
    server.h2_conn.receive_data(client.data_to_send())
    cmds = list(server._handle_event(error))
    assert len(cmds) == 1 and isinstance(cmds[0], commands.SendData)
    return client.receive_data(cmds[0].data)


def test_h2_server_sends_json_with_the_flows_status_and_request_id() -> None:
    addon = upstream.Upstream()
    with taddons.context(addon, Proxyserver()) as tctx:  # Proxyserver: the HTTP/2 options
        upstream.install_patch()
        try:
            f = tflow.tflow()
            f.request.headers["X-Request-ID"] = "rid-h2"
            f.metadata["waypost"] = {"timed_out": "read_timeout"}
            f.error = tflow.terr("server closed connection")
            addon.error(f)
            got = _h2_exchange(tctx, f, _protocol_error("server closed connection", 502))
            (resp,) = [e for e in got if isinstance(e, h2.events.ResponseReceived)]
            headers = dict(resp.headers)
            assert headers[b":status"] == b"504"
            assert headers[b"content-type"] == b"application/json"
            assert headers[b"x-request-id"] == b"rid-h2"
            body = b"".join(e.data for e in got if isinstance(e, h2.events.DataReceived))
            err = json.loads(body)["error"]
            assert (err["code"], err["request_id"]) == ("BACKEND_TIMEOUT", "rid-h2")
            assert any(isinstance(e, h2.events.StreamEnded) for e in got)

            # A flow whose error is not the one being sent (another stream's) is not used.
            addon.error(f)
            got = _h2_exchange(tctx, f, _protocol_error("[Errno 111] refused", 502))
            (resp,) = [e for e in got if isinstance(e, h2.events.ResponseReceived)]
            assert dict(resp.headers)[b":status"] == b"502"
            assert dict(resp.headers)[b"x-request-id"] != b"rid-h2"
        finally:
            addon.done()


def test_error_hook_ignores_killed_flows() -> None:
    addon = upstream.Upstream()
    with taddons.context(addon):
        f = tflow.tflow()
        f.kill()
        addon.error(f)
        assert "backend_error" not in f.metadata.get("waypost", {})
        addon.done()


def test_connect_error_response_becomes_json() -> None:
    addon = upstream.Upstream()
    with taddons.context(addon):
        f = tflow.tflow(
            req=tflow.treq(
                method=b"CONNECT", host="127.0.0.1", port=9, path=b"", authority=b"127.0.0.1:9"
            ),
            resp=False,
        )
        f.server_conn.error = "upstream connect timeout (1s)"
        f.response = http.Response.make(502, b"Cannot connect to 127.0.0.1:9: ...")
        addon.http_connect_error(f)
        assert f.response.status_code == 504
        assert json.loads(f.response.content)["error"]["code"] == "BACKEND_TIMEOUT"
        assert f.metadata["waypost"]["backend_error"] == "connect_timeout"
        addon.done()


def test_connect_error_from_another_addon_is_kept() -> None:
    addon = upstream.Upstream()
    with taddons.context(addon):
        f = tflow.tflow(resp=False)
        f.response = http.Response.make(403, b"no")
        addon.http_connect_error(f)
        assert f.response.status_code == 403
        addon.done()


@pytest.mark.parametrize("name", ["upstream_connect_timeout", "upstream_read_timeout"])
def test_configure_rejects_bad_durations(name: str) -> None:
    addon = upstream.Upstream()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match=name):
            tctx.configure(addon, **{name: "soon"})
        tctx.configure(addon, **{name: "250ms"})
        assert getattr(addon, name.removeprefix("upstream_")) == 0.25
        addon.done()


@pytest.mark.parametrize(
    "message",
    [
        "Client disconnected.",
        "HTTP/1 protocol error: peer closed connection without sending complete message body",
    ],
)
def test_client_side_errors_are_not_upstream_failures(message: str, caplog) -> None:
    addon = upstream.Upstream()
    with taddons.context(addon):
        f = tflow.tflow()
        f.request.timestamp_end = None  # the client went away before its request was complete
        f.error = tflow.terr(message)
        addon.error(f)
        meta = f.metadata.get("waypost", {})
        assert "backend_error" not in meta and "error_code" not in meta
        assert "upstream" not in caplog.text
        addon.done()


def test_upstream_failure_is_logged_once_with_host(caplog) -> None:
    addon = upstream.Upstream()
    with taddons.context(addon):
        f = tflow.tflow()
        f.error = tflow.terr("server closed connection")
        addon.error(f)
        assert f.metadata["waypost"]["backend_error"] == "closed"
        assert caplog.text.count("upstream 'address:22' failed: closed") == 1
        addon.done()


@pytest.mark.parametrize(
    ("request_end", "tcp_setup", "headers", "last_activity", "deadline"),
    [
        (100.0, None, False, 0.0, None),  # still connecting: the connect timeout rules
        (100.0, 90.0, False, 0.0, 110.0),  # reused connection: from the end of the request
        (100.0, 105.0, False, 0.0, 115.0),  # new connection: from the connect
        (100.0, 105.0, True, 120.0, 130.0),  # body: from the last byte
    ],
)
def test_read_deadline(
    request_end: float,
    tcp_setup: float | None,
    headers: bool,
    last_activity: float,
    deadline: float | None,
) -> None:
    assert upstream.read_deadline(10.0, request_end, tcp_setup, headers, last_activity) == deadline
