from __future__ import annotations

import json
import uuid

import pytest
from mitmproxy import http
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.test import tflow

from addons import errors
from addons.errors import Failure, classify, reason_of
from addons.kernel.record import record


@pytest.mark.parametrize("code, status", sorted(errors.STATUS.items()))
def test_make_builds_the_json_error(code: str, status: int) -> None:
    f = tflow.tflow()
    resp = errors.make(code, "why", f)
    assert resp.status_code == status
    assert resp.reason  # mitmproxy 11 leaves 429/431 without a phrase
    assert resp.headers["content-type"] == "application/json"
    body = json.loads(resp.content)["error"]
    assert body["code"] == code and body["message"] == "why"
    assert body["request_id"] == resp.headers["x-request-id"] == errors.request_id(f)
    assert body["timestamp"].endswith("Z")
    assert record(f)["error_code"] == code


@pytest.mark.parametrize(
    "incoming, kept",
    [
        ("abc-123", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("bad id", False),
        ("x\r\ny", False),
        ("", False),
    ],
)
def test_request_id_keeps_only_valid_incoming_ids(incoming: str, kept: bool) -> None:
    f = tflow.tflow()
    if incoming:
        f.request.headers["X-Request-ID"] = incoming
    rid = errors.request_id(f)
    assert (rid == incoming) is kept
    assert errors.request_id(f) == rid  # stable per flow


def test_new_request_ids_are_unique_version_4_uuids() -> None:
    ids = {errors.new_request_id() for _ in range(10000)}
    assert len(ids) == 10000
    for rid in list(ids)[:100]:
        u = uuid.UUID(rid)
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == rid


class Policy:
    @errors.fail_closed
    def requestheaders(self, flow: object) -> None:
        raise RuntimeError("boom")

    @errors.fail_closed
    async def request(self, flow: object) -> None:
        raise RuntimeError("boom")


def test_fail_closed_refuses_on_exception() -> None:
    f = tflow.tflow()
    Policy().requestheaders(f)
    assert f.response.status_code == 500
    assert json.loads(f.response.content)["error"]["code"] == "INTERNAL_ERROR"


async def test_fail_closed_refuses_on_exception_in_async_hooks() -> None:
    f = tflow.tflow()
    await Policy().request(f)
    assert f.response.status_code == 500


# --- mitmproxy's errors as Waypost's (moved from test_upstream.py with errors.classify) -------

# What mitmproxy says (status it would send, message), and what the client must get.
CASES = [
    (
        502,
        "[Errno 111] Connect call failed ('127.0.0.1', 9)",
        None,
        "BACKEND_UNREACHABLE",
        502,
        "connection_refused",
    ),
    (502, "[Errno -2] Name or service not known", None, "BACKEND_UNREACHABLE", 502, "dns_failure"),
    (
        502,
        "[Errno -3] Temporary failure in name resolution",
        None,
        "BACKEND_UNREACHABLE",
        502,
        "dns_failure",
    ),
    (502, "[Errno 101] Network is unreachable", None, "BACKEND_UNREACHABLE", 502, "unreachable"),
    (502, "[Errno 113] No route to host", None, "BACKEND_UNREACHABLE", 502, "unreachable"),
    (
        502,
        "[Errno 110] Connect call failed ('10.0.0.1', 80)",
        None,
        "BACKEND_TIMEOUT",
        504,
        "connect_timeout",
    ),
    (502, "upstream connect timeout (1s)", None, "BACKEND_TIMEOUT", 504, "connect_timeout"),
    (502, "server closed connection", "read_timeout", "BACKEND_TIMEOUT", 504, "read_timeout"),
    (502, "server closed connection", None, "BACKEND_UNREACHABLE", 502, "closed"),
    (
        502,
        "Cannot parse HTTP response: bad status",
        None,
        "BACKEND_UNREACHABLE",
        502,
        "invalid_response",
    ),
    (
        502,
        "Response body exceeds mitmproxy's body_size_limit.",
        None,
        "BACKEND_UNREACHABLE",
        502,
        "response_too_large",
    ),
    (
        502,
        "Connection killed: Request destination unknown. Unable to figure out where this request "
        "should be forwarded to.",
        None,
        "BACKEND_UNREACHABLE",
        502,
        "self_connect",
    ),
    (
        502,
        "Connection killed: Waypost egress policy refused the connection (blocked_networks)",
        None,
        "BACKEND_UNREACHABLE",
        502,
        "connection_killed",  # the policy, not the backend: the router does not count it
    ),
    (
        502,
        "Connection killed: Cannot resolve nowhere.invalid: [Errno -2] Name or service not known",
        None,
        "BACKEND_UNREACHABLE",
        502,
        "dns_failure",
    ),
    (
        502,
        "Connection killed: blocked by egress policy",
        None,
        "BACKEND_UNREACHABLE",
        502,
        "connection_killed",
    ),
    (
        413,
        "Request body exceeds mitmproxy's body_size_limit.",
        None,
        "PAYLOAD_TOO_LARGE",
        413,
        "request_too_large",
    ),
    (
        400,
        "HTTP request has no host header, destination unknown.",
        None,
        "BAD_REQUEST",
        400,
        "bad_request",
    ),
    (400, "Bad HTTP request line: b'x'", None, "BAD_REQUEST", 400, "bad_request"),
    (504, "gateway timeout", None, "BACKEND_TIMEOUT", 504, "error"),
    (503, "whatever", None, "CIRCUIT_OPEN", 503, "error"),
    (499, "client closed", None, "INTERNAL_ERROR", 499, "error"),
    # status unknown (the `error` hook only has the message): inferred
    (
        None,
        "[Errno 111] Connect call failed ('127.0.0.1', 9)",
        None,
        "BACKEND_UNREACHABLE",
        502,
        "connection_refused",
    ),
    (None, "upstream connect timeout (10s)", None, "BACKEND_TIMEOUT", 504, "connect_timeout"),
    (None, "server closed connection", "read_timeout", "BACKEND_TIMEOUT", 504, "read_timeout"),
    (
        None,
        "Request body exceeds mitmproxy's body_size_limit.",
        None,
        "PAYLOAD_TOO_LARGE",
        413,
        "request_too_large",
    ),
    (None, "HTTP/1 protocol error: bad chunk", None, "BAD_REQUEST", 400, "bad_request"),
]


@pytest.mark.parametrize(("status", "message", "timed_out", "code", "out_status", "reason"), CASES)
def test_classify(
    status: int | None, message: str, timed_out: str | None, code: str, out_status: int, reason: str
) -> None:
    f = classify(status, message, timed_out)
    assert (f.code, f.status, f.reason) == (code, out_status, reason)
    assert f.message


def test_a_timeout_never_hides_a_client_error() -> None:
    assert classify(400, "bad", "read_timeout").code == "BAD_REQUEST"


@pytest.mark.parametrize(
    ("message", "reason"),
    [("", "error"), ("something odd", "error"), ("Cannot connect to x:1: boom", "connect_failed")],
)
def test_reason_of(message: str, reason: str) -> None:
    assert reason_of(message) == reason


def test_failure_is_a_plain_tuple() -> None:
    assert Failure("BAD_REQUEST", 400, "bad_request", "x")._asdict()["status"] == 400


# --- the error page (wire's and upstream's replacements of make_error_response, now one) ------


def _page(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower()
    assert b"connection: close" in head.lower()
    return int(head.split()[1]), json.loads(body)["error"]["code"]


def test_make_error_response_json_for_client_errors() -> None:
    errors.install_error_page("test_errors")
    try:
        assert _page(_http1.make_error_response(400, "bad")) == (400, "BAD_REQUEST")
        # One page for every status now (hygiene alone used to leave mitmproxy's HTML here).
        assert _page(_http1.make_error_response(502, "upstream")) == (502, "BACKEND_UNREACHABLE")
    finally:
        errors.uninstall_error_page("test_errors")


@pytest.mark.parametrize(
    "status, code",
    [
        (400, "BAD_REQUEST"),
        (401, "UNAUTHORIZED"),
        (403, "ACCESS_DENIED"),  # the first of the 403 codes
        (413, "PAYLOAD_TOO_LARGE"),
        (422, "CONFIG_INVALID"),
        (503, "CIRCUIT_OPEN"),
        (418, None),
    ],
)
def test_code_of_reads_the_one_table_backwards(status: int, code: str | None) -> None:
    assert errors.code_of(status) == code


def test_web_error_is_the_same_body_as_an_aiohttp_response() -> None:
    resp = errors.web_error("METHOD_NOT_ALLOWED", "Use GET.", "rid-1", {"Allow": "GET"})
    assert resp.status == 405 and resp.content_type == "application/json"
    assert resp.headers["X-Request-ID"] == "rid-1" and resp.headers["Allow"] == "GET"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.body is not None
    err = json.loads(bytes(resp.body))["error"]
    assert (err["code"], err["message"], err["request_id"]) == (
        "METHOD_NOT_ALLOWED",
        "Use GET.",
        "rid-1",
    )
    fresh = errors.web_error("CONFIG_INVALID", "bad", status=409)
    assert fresh.status == 409 and uuid.UUID(fresh.headers["X-Request-ID"])


def test_error_page_of_a_flow_uses_its_request_id_and_timers() -> None:
    f = tflow.tflow()
    f.request.headers["X-Request-ID"] = "rid-7"
    record(f)["timed_out"] = "read_timeout"
    head, _, body = errors.error_page(502, "server closed connection", f).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504 ")
    err = json.loads(body)["error"]
    assert (err["code"], err["request_id"]) == ("BACKEND_TIMEOUT", "rid-7")


class _Reader(_http1.Http1Server):
    """A stand-in for the HTTP/1 reader that refuses what it read, as the wire guards do."""

    def __init__(self, request: http.Request | None) -> None:
        self.request = request

    def refuse(self, status: int) -> bytes:
        return _http1.make_error_response(status, "Malformed chunked request body")


@pytest.mark.parametrize(
    "incoming, echoed",
    [("client-1", True), ("bad id with spaces", False), (None, False)],
)
def test_error_page_without_a_flow_echoes_the_requests_valid_id(
    incoming: str | None, echoed: bool
) -> None:
    request = tflow.treq()
    if incoming is not None:
        request.headers["X-Request-ID"] = incoming
    errors.install_error_page("test_errors")
    try:
        for status in (400, 413, 502):
            page = _Reader(request).refuse(status)
            head, _, body = page.partition(b"\r\n\r\n")
            rid = json.loads(body)["error"]["request_id"]
            assert f"X-Request-ID: {rid}\r\n".encode() in head
            assert (rid == incoming) is echoed
        # no request head read (garbage, a timeout): a fresh id
        _, _, body = _Reader(None).refuse(400).partition(b"\r\n\r\n")
        assert uuid.UUID(json.loads(body)["error"]["request_id"])
    finally:
        errors.uninstall_error_page("test_errors")


def test_error_page_and_flow_share_a_fresh_id_whichever_comes_first() -> None:
    errors.install_error_page("test_errors")
    try:
        # the page goes out before the flow's error hook: the flow takes the page's id
        f = tflow.tflow()
        f.request.timestamp_end = None
        _, _, page = _Reader(f.request).refuse(400).partition(b"\r\n\r\n")
        assert errors.request_id(f) == json.loads(page)["error"]["request_id"]
        # an answer chosen at the head, before the body failed: the page takes its id
        g = tflow.tflow()
        g.request.timestamp_end = None
        chosen = errors.make("CIRCUIT_OPEN", "No backend.", g)
        _, _, page = _Reader(g.request).refuse(400).partition(b"\r\n\r\n")
        assert json.loads(page)["error"]["request_id"] == chosen.headers["X-Request-ID"]
    finally:
        errors.uninstall_error_page("test_errors")
