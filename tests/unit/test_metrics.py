from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from mitmproxy import connection, flow
from mitmproxy.addons import script
from mitmproxy.proxy import events
from mitmproxy.test import taddons, tflow, tutils
from mitmproxy.version import VERSION

from addons import metrics
from addons.kernel.record import record

ROOT = Path(__file__).resolve().parents[2]
REG = metrics.REGISTRY


def value(name: str, **labels: str) -> float:
    return REG.get_sample_value(name, labels) or 0.0


def requests(method: str, status: str, backend: str = "") -> float:
    return value("http_requests_total", method=method, status=status, backend=backend)


@pytest.mark.parametrize(
    "method,label",
    [
        ("GET", "GET"),
        ("POST", "POST"),
        ("CONNECT", "CONNECT"),
        ("PATCH", "PATCH"),
        ("get", "OTHER"),
        ("PROPFIND", "OTHER"),
        ("", "OTHER"),
    ],
)
def test_method_label(method: str, label: str) -> None:
    assert metrics.method_label(method) == label


def test_response_counts_status_duration_and_bytes() -> None:
    m = metrics.Metrics()
    with taddons.context(m):
        f = tflow.tflow(resp=True)
        f.request.content = b"abc"
        f.response.content = b"hello"
        f.response.status_code = 404
        f.request.timestamp_start = f.response.timestamp_end - 0.2
        before = (
            requests("GET", "404"),
            value("http_request_duration_seconds_count"),
            value("http_request_duration_seconds_bucket", le="0.1"),
            value("http_request_bytes_total", direction="in"),
            value("http_request_bytes_total", direction="out"),
        )
        m.response(f)
        m.response(f)  # a second event for the same flow is not counted twice
        m.error(f)
        assert requests("GET", "404") == before[0] + 1
        assert value("http_request_duration_seconds_count") == before[1] + 1
        assert value("http_request_duration_seconds_bucket", le="0.1") == before[2]
        assert value("http_request_bytes_total", direction="in") == before[3] + 3
        assert value("http_request_bytes_total", direction="out") == before[4] + 5


def test_error_without_response_counts_status_error() -> None:
    m = metrics.Metrics()
    with taddons.context(m):
        f = tflow.tflow(err=True)
        f.request.method = "FOO"
        before = requests("OTHER", "error")
        m.error(f)
        assert requests("OTHER", "error") == before + 1


def _failed(message: str, complete: bool = True, answer: int | None = None, stream=False):
    f = tflow.tflow(err=True)
    f.error = flow.Error(message)
    f.request.timestamp_end = 2.0 if complete else None
    f.request.stream = stream
    if answer is not None:
        f.response = tutils.tresp(status_code=answer)
    return f


@pytest.mark.parametrize(
    "f,code,sent",
    [
        # the proxy answered the backend's failure itself (upstream recorded its code)
        (_failed("[Errno 111] Connect call failed"), "BACKEND_UNREACHABLE", 502),
        (_failed("read timed out"), "BACKEND_TIMEOUT", 504),
        # nobody was left to answer, or the client's body ended early: nothing was sent
        (_failed("Client disconnected."), None, None),
        # a backend response already (partly) on the wire when the client left
        (_failed("Client disconnected.", answer=200), None, 200),
        # an answer set at the request's head never went out: the body's error page did
        (_failed("HTTP/1 protocol error: bad chunk", False, 503), "CIRCUIT_OPEN", 400),
        (_failed("The request body exceeds the limit of 10 bytes.", False, 503), None, 413),
        (_failed("HTTP/1 protocol error: peer closed connection", False, 503), None, None),
        (_failed("Client disconnected.", False, 403), "ACCESS_DENIED", None),
        # a streamed request's response is the backend's, sent while it was still uploading
        (_failed("Client disconnected.", False, 413, stream=True), None, 413),
    ],
)
def test_sent_status_is_what_the_client_received(
    f: flow.Flow, code: str | None, sent: int | None
) -> None:
    if code is not None:
        record(f)["error_code"] = code
    assert metrics.sent_status(f) == sent
    m = metrics.Metrics()
    with taddons.context(m):
        label = str(sent) if sent is not None else "error"
        before = requests("GET", label)
        m.error(f)
        assert requests("GET", label) == before + 1


def test_streamed_bodies_do_not_break_counting() -> None:
    m = metrics.Metrics()
    with taddons.context(m):
        f = tflow.tflow(resp=True)
        f.response.raw_content = None
        before = requests("GET", "200")
        m.response(f)
        assert requests("GET", "200") == before + 1


def _connect_flow(status: int) -> flow.Flow:
    f = tflow.tflow(
        req=tutils.treq(method=b"CONNECT", host="example.com", port=443, path=b"", authority=b"x"),
        resp=True,
    )
    f.response.status_code = status
    return f


def test_connect_flows_count_as_connect() -> None:
    m = metrics.Metrics()
    with taddons.context(m):
        ok, refused = _connect_flow(200), _connect_flow(403)
        before = requests("CONNECT", "200"), requests("CONNECT", "403")
        bytes_in = value("http_request_bytes_total", direction="in")
        m.http_connected(ok)
        m.http_connect_error(refused)
        assert requests("CONNECT", "200") == before[0] + 1
        assert requests("CONNECT", "403") == before[1] + 1
        assert value("http_request_bytes_total", direction="in") == bytes_in


def test_policy_decisions_from_waypost_metadata() -> None:
    m = metrics.Metrics()
    with taddons.context(m):
        f = tflow.tflow(resp=True)
        record(f).update(decision="blocked", rule="ads")
        before = value("policy_decisions_total", policy="core", decision="blocked", rule="ads")
        m.response(f)
        assert (
            value("policy_decisions_total", policy="core", decision="blocked", rule="ads")
            == before + 1
        )
        plain = tflow.tflow(resp=True)  # no decision recorded: no decision series
        n = len(metrics.STORE.decisions)
        m.response(plain)
        assert len(metrics.STORE.decisions) == n


def test_decision_series_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_DECISION_SERIES", 0)
    m = metrics.Metrics()
    with taddons.context(m):
        f = tflow.tflow(resp=True)
        record(f).update(decision="blocked", rule="a-rule-never-seen")
        before = value("policy_decisions_total", policy="core", decision="blocked", rule="_other")
        m.response(f)
        assert (
            value("policy_decisions_total", policy="core", decision="blocked", rule="_other")
            == before + 1
        )
        assert (
            value(
                "policy_decisions_total",
                policy="core",
                decision="blocked",
                rule="a-rule-never-seen",
            )
            == 0
        )


def test_locally_answered_flows_are_not_counted() -> None:
    m = metrics.Metrics()
    with taddons.context(m):
        f = tflow.tflow(resp=True)
        record(f)["local"] = "health"
        before = requests("GET", "200")
        m.response(f)
        assert requests("GET", "200") == before


def test_active_connections_gauge() -> None:
    m = metrics.Metrics()
    with taddons.context(m):
        c1, c2 = tflow.tclient_conn(), tflow.tclient_conn()
        before = value("proxy_active_connections")
        m.client_connected(c1)
        m.client_connected(c2)
        assert value("proxy_active_connections") == before + 2
        m.client_disconnected(c1)
        m.client_disconnected(c1)  # twice: counted once
        assert value("proxy_active_connections") == before + 1
        m.client_disconnected(c2)
        stranger = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2))
        m.client_disconnected(stranger)  # connected before the addon loaded: ignored
        assert value("proxy_active_connections") == before


def test_script_load_and_reload_share_one_registry() -> None:
    """Loading the file as a mitmproxy script (twice, as a reload does) registers nothing new."""
    with taddons.context():
        sc = script.Script(str(ROOT / "addons" / "metrics.py"), False)
        first = sc.ns
        sc.loadscript()  # what the reload watcher does on a file change
        second = sc.ns
        assert first is not None and second is not None and second is not first
        assert second.REGISTRY is first.REGISTRY is metrics.REGISTRY
        f = tflow.tflow(resp=True)
        f.response.status_code = 599
        before = requests("GET", "599")
        second.addons[0].response(f)
        assert requests("GET", "599") == before + 1


def test_benchmark_response_hook(capsys: pytest.CaptureFixture[str]) -> None:
    """Micro-benchmark of the per-request cost (response hook, warm label cache)."""
    m = metrics.Metrics()
    with taddons.context(m):
        f = tflow.tflow(resp=True)
        f.request.content = b"x" * 100
        f.response.content = b"y" * 1000
        record(f).update(decision="allowed", rule="default")
        n = 20000
        meta = f.metadata
        m.response(f)
        t0 = time.perf_counter()
        for _ in range(n):
            del meta[metrics._COUNTED]
            m.response(f)
        per_request = (time.perf_counter() - t0) / n * 1e6
        c = tflow.tclient_conn()
        t0 = time.perf_counter()
        for _ in range(n):
            m.client_connected(c)
            m.client_disconnected(c)
        per_conn = (time.perf_counter() - t0) / n * 1e6
    with capsys.disabled():
        print(
            f"\nmetrics addon: {per_request:.2f} us per request (response hook), "
            f"{per_conn:.2f} us per connection (connect + disconnect)"
        )
    assert per_request < 100  # generous bound for slow CI machines; the target is ~10 us


def test_requests_carry_the_routed_backend() -> None:
    m = metrics.Metrics()
    with taddons.context(m):
        f = tflow.tflow(resp=True)
        record(f)["backend"] = "api-1"
        before = requests("GET", "200", "api-1")
        m.response(f)
        assert requests("GET", "200", "api-1") == before + 1


def test_build_info() -> None:
    labels = {
        "version": importlib.metadata.version("waypost"),
        "mitmproxy": VERSION,
        "python": platform.python_version(),
    }
    assert value("waypost_build_info", **labels) == 1.0


def connect_flow() -> flow.Flow:
    f = tflow.tflow(resp=True)
    f.request = tutils.treq(method=b"CONNECT", host="example.com", port=443, path=b"")
    f.request.authority = "example.com:443"
    return f


def test_tunnel_bytes_counted_once_when_the_tunnel_closes() -> None:
    f = connect_flow()
    before_in = value("tunnel_bytes_total", direction="in")
    before_out = value("tunnel_bytes_total", direction="out")
    metrics.watch_tunnel(f)
    metrics.watch_tunnel(f)  # the access log watches it too
    t = metrics.TUNNELS[f.client_conn.id]
    t.up, t.down = 10, 300
    assert metrics.end_tunnel(f.client_conn) is t
    assert value("tunnel_bytes_total", direction="in") == before_in + 10
    assert value("tunnel_bytes_total", direction="out") == before_out + 300
    assert metrics.end_tunnel(f.client_conn) is t  # the second watcher still gets it
    assert value("tunnel_bytes_total", direction="in") == before_in + 10
    assert f.client_conn.id not in metrics.TUNNELS
    assert metrics.end_tunnel(f.client_conn) is None


def test_a_refused_connect_is_no_tunnel() -> None:
    f = connect_flow()
    f.response.status_code = 502
    metrics.watch_tunnel(f)
    assert f.client_conn.id not in metrics.TUNNELS


def test_watch_layer_counts_every_event_of_the_tunnel() -> None:
    f = connect_flow()
    metrics.watch_tunnel(f)
    seen: list[events.Event] = []

    def stream_handler(event: events.Event) -> Iterator[None]:
        seen.append(event)
        return iter(())

    nextlayer = SimpleNamespace(data_client=lambda: b"hello", data_server=lambda: b"")
    stream = SimpleNamespace(child_layer=nextlayer, _handle_event=stream_handler)
    nextlayer.context = SimpleNamespace(client=f.client_conn, layers=[stream, nextlayer])
    metrics.watch_layer(nextlayer)  # type: ignore[arg-type]
    metrics.watch_layer(nextlayer)  # asked again: wrapped once
    server = f.server_conn
    for event in (
        events.DataReceived(f.client_conn, b"abc"),
        events.DataReceived(server, b"0123456789"),
        events.ConnectionClosed(server),
        events.ConnectionClosed(f.client_conn),
    ):
        list(stream._handle_event(event))
    assert len(seen) == 4
    t = metrics.end_tunnel(f.client_conn)
    assert t is not None and (t.up, t.down) == (5 + 3, 10)
    assert t.outcome() == "server_closed"
