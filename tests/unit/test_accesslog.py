from __future__ import annotations

import gc
import io
import json
import logging
import time
from collections.abc import Iterator

import pytest
from mitmproxy import exceptions, flow, hooks
from mitmproxy.addons.termlog import TermLog
from mitmproxy.test import taddons, tflow, tutils

from addons import accesslog, errors, metrics
from addons.accesslog import AccessLog, redact_url
from addons.kernel import logformat
from addons.kernel.logformat import JsonFormatter, TextFormatter
from addons.kernel.record import record


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://example.com/", "http://example.com/"),
        ("http://example.com/a?x=1&y=2", "http://example.com/a?x=1&y=2"),
        ("http://e.com/?token=abc", "http://e.com/?token=REDACTED"),
        ("http://e.com/?TOKEN=abc&x=1", "http://e.com/?TOKEN=REDACTED&x=1"),
        ("http://e.com/?x=1&api_key=k&y=2", "http://e.com/?x=1&api_key=REDACTED&y=2"),
        ("http://e.com/?x-api-key=k", "http://e.com/?x-api-key=REDACTED"),
        ("http://e.com/?access_token=t", "http://e.com/?access_token=REDACTED"),
        ("http://e.com/?client_secret=s", "http://e.com/?client_secret=REDACTED"),
        ("http://e.com/?password=p&passwd=q", "http://e.com/?password=REDACTED&passwd=REDACTED"),
        ("http://e.com/?Auth=a", "http://e.com/?Auth=REDACTED"),
        (
            "http://e.com/?X-Amz-Signature=s&sig=t",
            "http://e.com/?X-Amz-Signature=REDACTED&sig=REDACTED",
        ),
        ("http://e.com/?key=", "http://e.com/?key="),
        ("http://e.com/?key", "http://e.com/?key"),
        ("http://e.com/?%74oken=abc", "http://e.com/?%74oken=REDACTED"),
        ("http://e.com/?a=1#frag", "http://e.com/?a=1#frag"),
        ("http://e.com/?token=1#frag", "http://e.com/?token=REDACTED#frag"),
        ("http://e.com/path/token/x", "http://e.com/path/token/x"),
        ("http://user:pw@e.com/", "http://user:REDACTED@e.com/"),
        ("http://user@e.com/", "http://user@e.com/"),
        ("http://e.com/?next=http://u:p@x/", "http://e.com/?next=http://u:p@x/"),
        ("e.com:443", "e.com:443"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def _record(msg: str = "hello", **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("waypost.test", logging.WARNING, __file__, 1, msg, (), None)
    r.__dict__.update(extra)
    return r


EVIL = "a\x1b[31mred\nnext\x7f\u202e\x00end"


def test_json_formatter_escapes_everything() -> None:
    rec = _record("value %r", waypost={"ua": EVIL}, header=EVIL)
    rec.args = (EVIL,)
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "\x1b" not in line and "\x7f" not in line and "\x00" not in line
    assert "\u202e" not in line
    assert line.isascii() and line.isprintable()
    out = json.loads(line)
    assert out["ua"] == EVIL and out["header"] == EVIL
    assert out["level"] == "WARNING" and out["logger"] == "waypost.test"
    assert list(out)[:4] == ["timestamp", "level", "logger", "message"]


def test_a_critical_record_is_fatal_as_the_requirements_name_it() -> None:
    rec = _record("cannot start")
    rec.levelno, rec.levelname = logging.CRITICAL, "CRITICAL"
    assert json.loads(JsonFormatter().format(rec))["level"] == "FATAL"


def test_json_formatter_timestamp_and_exception() -> None:
    rec = _record()
    rec.created = 1700000000.123456
    try:
        raise ValueError("boom\x1b")
    except ValueError:
        import sys

        rec.exc_info = sys.exc_info()
    out = json.loads(JsonFormatter().format(rec))
    assert out["timestamp"] == "2023-11-14T22:13:20.123Z"
    assert "ValueError: boom" in out["exception"]


def test_json_formatter_mitmproxy_client_extra() -> None:
    rec = _record("client connect", client=("127.0.0.1", 5555))
    assert json.loads(JsonFormatter().format(rec))["client"] == "127.0.0.1:5555"


def test_text_formatter_escapes_fields() -> None:
    rec = _record("request", waypost={"url": EVIL, "status": 200, "plain": "ok"})
    line = TextFormatter().format(rec)
    assert "\n" not in line and "\x1b" not in line and "\x7f" not in line
    assert "status=200" in line and "plain=ok" in line
    assert 'url="a\\u001b[31mred\\nnext' in line


# --- access lines ----------------------------------------------------------------------------------


@pytest.fixture
def term() -> Iterator[tuple[AccessLog, io.StringIO, taddons.context]]:
    """The addon next to a real TermLog writing to a buffer, as in mitmdump."""
    out = io.StringIO()
    termlog = TermLog(out=out)
    addon = AccessLog()
    root = logging.getLogger()
    root_level = root.level
    try:
        with taddons.context(termlog, addon) as tctx:
            # MitmLogHandler passes only records of the pytest phase it was made in (setup, not
            # call), and the Master's handler evicted it from the root: undo both, and log at
            # DEBUG like mitmproxy's main does.
            termlog.logger._initiated_in_test = None
            termlog.logger.install()
            root.setLevel(logging.DEBUG)
            # mitmdump's script loader configures a new addon with every option; do the same.
            tctx.master.addons.invoke_addon_sync(
                addon, hooks.ConfigureHook(set(tctx.options.keys()))
            )
            yield addon, out, tctx
    finally:
        addon.done()
        termlog.uninstall()
        root.setLevel(root_level)


def make_flow() -> flow.Flow:
    f = tflow.tflow(resp=True)
    f.request.url = "http://example.com/path?token=secret&q=1"
    f.request.timestamp_start = 1000.0
    f.response.timestamp_end = 1000.25
    f.client_conn.peername = ("::ffff:198.51.100.3", 4000)
    return f


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in out.getvalue().splitlines() if x.startswith("{")]


def test_access_line_fields(term) -> None:
    addon, out, _ = term
    f = make_flow()
    record(f).update({"decision": "allowed", "rule": "*.example.com", "cache": "HIT"})
    addon.response(f)
    addon.error(f)  # a later error on the same flow does not log twice
    (line,) = [x for x in lines(out) if x["logger"] == "waypost.access"]
    assert line["message"] == "request"
    assert line["level"] == "INFO"
    assert line["url"] == "http://example.com/path?token=REDACTED&q=1"
    assert line["client_ip"] == "198.51.100.3"
    assert line["method"] == "GET" and line["status"] == 200
    assert line["duration_ms"] == 250.0
    assert line["bytes_sent"] == len(f.response.raw_content)
    assert line["bytes_received"] == len(f.request.raw_content)
    assert line["cache_hit"] is True
    assert line["backend"] == "address:22"
    assert line["decision"] == "allowed" and line["rule"] == "*.example.com"
    assert line["request_id"] == errors.request_id(f)


def test_access_line_is_compact_json(term) -> None:
    addon, out, _ = term
    addon.response(make_flow())
    (raw,) = [x for x in out.getvalue().splitlines() if "waypost.access" in x]
    # The PRD's troubleshooting grep: no space after the colon, none after the comma.
    assert '"duration_ms":250.0,' in raw and '": ' not in raw and '", "' not in raw


def test_user_agent_and_trace_id(term) -> None:
    addon, out, _ = term
    f = make_flow()
    f.request.headers["User-Agent"] = "curl/8.5\x1b[31m" + "x" * 1000
    f.request.headers["traceparent"] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    addon.response(f)
    g = make_flow()
    g.request.headers["traceparent"] = "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
    addon.response(g)
    first, second = lines(out)
    assert first["user_agent"] == ("curl/8.5\x1b[31m" + "x" * 1000)[: accesslog.USER_AGENT_MAX]
    assert "\x1b" not in out.getvalue()
    assert first["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert "user_agent" not in second and "trace_id" not in second


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "4bf92f3577b34da6a3ce929d0e0e4736",
        ),
        (
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00 ",
            "4bf92f3577b34da6a3ce929d0e0e4736",
        ),
        (
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "4bf92f3577b34da6a3ce929d0e0e4736",
        ),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", None),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),
        ("", None),
        (None, None),
    ],
)
def test_trace_id(value: str | None, expected: str | None) -> None:
    assert accesslog.trace_id(value) == expected


def test_error_line(term) -> None:
    addon, out, _ = term
    f = make_flow()
    f.response = None
    f.error = flow.Error("Connect call failed \x1b")
    record(f)["error_code"] = "BACKEND_UNREACHABLE"
    addon.error(f)
    (line,) = lines(out)
    assert line["status"] == 502 and line["error_code"] == "BACKEND_UNREACHABLE"
    assert line["error"] == "Connect call failed \x1b"
    assert "\x1b" not in out.getvalue()


def test_an_answer_that_never_went_out_is_not_logged(term) -> None:
    addon, out, _ = term
    f = make_flow()
    f.request.headers["X-Request-ID"] = "client-1"
    f.response = errors.make("CIRCUIT_OPEN", "No backend.", f)  # set at the request's head
    f.request.timestamp_end = None  # its body was malformed: the client got the 400 page
    f.error = flow.Error("HTTP/1 protocol error: Invalid chunk size")
    addon.error(f)
    (line,) = lines(out)
    assert line["status"] == 400 and line["bytes_sent"] == 0
    assert line["request_id"] == "client-1"


def test_connect_line(term) -> None:
    addon, out, _ = term
    f = tflow.tflow(resp=True)
    f.request = tutils.treq(method=b"CONNECT", host="example.com", port=443, path=b"")
    f.request.authority = "example.com:443"
    addon.http_connected(f)
    (line,) = lines(out)
    assert line["message"] == "connect" and line["method"] == "CONNECT"
    assert line["url"] == "example.com:443"
    assert line["bytes_sent"] == 0 and line["request_id"]


def test_tunnel_closing_line(term) -> None:
    addon, out, _ = term
    f = tflow.tflow(resp=True)
    f.request = tutils.treq(method=b"CONNECT", host="example.com", port=443, path=b"")
    f.request.authority = "example.com:443"
    f.request.timestamp_start = time.time() - 2
    addon.http_connected(f)
    t = metrics.TUNNELS[f.client_conn.id]
    t.up, t.down, t.closed_by = 517, 4096, "client"
    addon.client_disconnected(f.client_conn)
    addon.client_disconnected(f.client_conn)  # once only
    opened, closed = lines(out)
    assert opened["message"] == "connect" and opened["bytes_sent"] == 0
    assert closed["message"] == "tunnel" and closed["request_id"] == opened["request_id"]
    assert closed["url"] == "example.com:443" and closed["status"] == 200
    assert closed["bytes_received"] == 517 and closed["bytes_sent"] == 4096
    assert closed["outcome"] == "client_closed" and "error" not in closed
    assert closed["duration_ms"] >= 2000
    assert f.client_conn.id not in metrics.TUNNELS


def test_tunnel_error_outcome(term) -> None:
    addon, out, _ = term
    f = tflow.tflow(resp=True)
    f.request = tutils.treq(method=b"CONNECT", host="example.com", port=443, path=b"")
    addon.http_connected(f)
    f.server_conn.error = "Connection reset by peer"
    addon.client_disconnected(f.client_conn)
    closed = lines(out)[-1]
    assert closed["outcome"] == "error" and closed["error"] == "Connection reset by peer"


def test_level_warning_disables_access_lines(term) -> None:
    addon, out, tctx = term
    tctx.configure(addon, log_level="warning")
    f = make_flow()
    addon.response(f)
    assert out.getvalue() == ""
    assert "waypost.accesslog.logged" not in f.metadata


def test_text_mode(term) -> None:
    addon, out, tctx = term
    tctx.configure(addon, log_format="text")
    addon.response(make_flow())
    (line,) = out.getvalue().splitlines()
    assert not line.startswith("{")
    assert "request request_id=" in line and "status=200" in line and "token=REDACTED" in line


def test_mitmproxy_records_become_json(term) -> None:
    _, out, _ = term
    logging.getLogger("mitmproxy.proxy.mode_servers").info(
        "HTTP(S) proxy listening at 127.0.0.1:8080."
    )
    logging.getLogger("mitmproxy.proxy.server").info("client connect")  # raised to WARNING
    (line,) = lines(out)
    assert line["message"] == "HTTP(S) proxy listening at 127.0.0.1:8080."


def test_debug_level(term) -> None:
    addon, out, tctx = term
    tctx.configure(addon, log_level="debug")
    logging.getLogger("waypost.test").debug("waypost detail")
    logging.getLogger("mitmproxy.proxy.server").info("client connect")
    logging.getLogger("mitmproxy.proxy.layers").debug("mitmproxy detail")  # termlog_verbosity
    assert [x["message"] for x in lines(out)] == ["waypost detail", "client connect"]
    tctx.configure(addon, log_level="info")
    logging.getLogger("waypost.test").debug("hidden")
    logging.getLogger("mitmproxy.proxy.server").info("hidden")
    assert len(lines(out)) == 2


def test_file_output(term, tmp_path) -> None:
    addon, out, tctx = term
    path = tmp_path / "access.log"
    tctx.configure(addon, log_output="file", log_file=str(path))
    addon.response(make_flow())
    logging.getLogger("waypost.test").warning("to the file only")
    logging.getLogger("waypost.test").error("to both")
    addon.done()  # stops the writer thread, flushing
    written = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["message"] for x in written] == ["request", "to the file only", "to both"]
    assert [x["message"] for x in lines(out)] == ["to both"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"log_output": "file"}, "log_file: empty"),
        ({"log_output": "file", "log_file": "/nonexistent-dir/x.log"}, "does not exist"),
        ({"log_output": "file", "log_file": "/"}, "directory"),
    ],
)
def test_invalid_file_options(term, options, match) -> None:
    addon, _, tctx = term
    with pytest.raises(exceptions.OptionsError, match=match):
        tctx.configure(addon, **options)


def test_benchmark_access_line(term) -> None:
    """Prints µs per access line (built, JSON-encoded and written to a buffer) next to one
    mitmproxy Headers.get, each the best of several rounds; asserts nothing about time."""
    addon, out, _ = term
    base = make_flow()
    # as after forwarding.requestheaders: request id and client IP already recorded
    record(base).update({"decision": "allowed", "client_ip": "198.51.100.3"})
    errors.request_id(base)
    rounds, n = 8, 400
    flows = []
    for _ in range(rounds * n):
        f = base.copy()
        f.metadata = {"waypost": dict(record(base))}
        flows.append(f)
    sample = accesslog.access_fields(base, time.time())

    def best(fn) -> float:
        times = []
        for r in range(rounds):
            batch = flows[r * n : (r + 1) * n]
            t0 = time.perf_counter()
            for f in batch:
                fn(f)
            times.append((time.perf_counter() - t0) / n * 1e6)
        return min(times)

    gc.disable()
    try:
        get = best(lambda f: f.request.headers.get("x-request-id"))
        dumps = best(lambda f: logformat.to_json(sample))
        per = best(addon.response)
    finally:
        gc.enable()
    assert len(out.getvalue().splitlines()) == rounds * n
    print(
        f"\naccess line: {per:.1f} µs (json.dumps alone {dumps:.1f} µs); "
        f"one Headers.get: {get:.1f} µs"
    )
