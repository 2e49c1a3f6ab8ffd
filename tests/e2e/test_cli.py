"""POST /cli/execute through a real mitmdump: streaming, limits, isolation, refusals.

Timing bounds are generous for a loaded 2-core machine, but each one would fail if output
were buffered until the process ended.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MANAGEMENT, Proxy, json_body, raw_request, start_proxy, status_of
from tests.e2e.cli_helpers import TOKEN, Stream, execute, group_members, wait_gone

CLI_LISTENER = r"cli listening at 127\.0\.0\.1:(\d+)"
ROOT_USER = os.geteuid() == 0
# Commands run as nobody when the tests run as root: they must be readable by everyone.
PYTHON = "/usr/bin/python3" if ROOT_USER else sys.executable
COMMANDS = ["/bin/sh", "/bin/echo", "/bin/cat", "/usr/bin/env", "/usr/bin/id", "/usr/bin/yes"]
if os.path.exists(PYTHON):
    COMMANDS.append(PYTHON)
BASE: dict[str, object] = {
    "metrics_port": 0,
    "cli_enabled": True,
    "cli_token": TOKEN,
    "cli_allowed_commands": COMMANDS,
    "cli_env_allowlist": ["LANG", "GREETING"],
    "cli_argument_rules": json.dumps({"id": {"patterns": ["-[ugn]+"], "max_args": 2}}),
    "cli_grace_period": "500ms",
    "cli_process_timeout": "20s",
    "cli_max_memory_per_process": "200MB",
    "cli_max_output_bytes": "64KB",
    "cli_heartbeat_interval": "300ms",
}


class Cli:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.port = proxy.port
        self.mport = int(proxy.wait_for(MANAGEMENT).group(1))
        self.internal = int(proxy.wait_for(CLI_LISTENER).group(1))

    def metrics(self) -> str:
        with httpx.Client(trust_env=False, timeout=5) as c:
            return c.get(f"http://127.0.0.1:{self.mport}/metrics").text


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    """One bundle for most tests (they do not change its config)."""
    p = start_proxy(tmp_path_factory.mktemp("cli"), options=BASE)
    try:
        yield Cli(p)
    finally:
        p.stop()


def start(proxy_factory: Callable[..., Proxy], **options: object) -> Cli:
    return Cli(proxy_factory(options={**BASE, **options}))


def sh(script: str, **extra: Any) -> dict[str, Any]:
    return {"command": "sh", "args": ["-c", script], **extra}


# --- streaming ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["proxy", "management"])
def test_output_arrives_line_by_line_in_real_time(cli: Cli, where: str) -> None:
    port = cli.port if where == "proxy" else cli.mport
    r = execute(port, sh("for i in 1 2 3 4 5; do echo line $i; sleep 0.3; done"))
    assert r.status == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    assert r.headers["transfer-encoding"] == "chunked"
    assert [e["seq"] for _, e in r.events] == list(range(len(r.events)))
    start_t, start = r.events[0]
    assert start["type"] == "start" and start["pid"] > 0
    lines = [(t, e) for t, e in r.events if e["type"] == "stdout"]
    assert [e["data"] for _, e in lines] == [f"line {i}\n" for i in range(1, 6)]
    times = [t for t, _ in lines]
    # Real time: the first line well before the command ends (1.5 s), and each next line
    # about 300 ms after the previous one, not all at the end.
    assert start_t < 1.0 and times[0] < 1.0, times
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert sum(g > 0.15 for g in gaps) >= 3, gaps  # one late read may join two lines
    assert times[-1] - times[0] > 0.9, times
    assert r.exit["code"] == 0 and r.exit["outcome"] == "ok"
    assert r.exit["max_rss_kb"] > 0 and r.exit["cpu_ms"] >= 0  # sampled while it ran
    print(f"{where}: start {start_t * 1000:.0f} ms, first line {times[0] * 1000:.0f} ms")


def test_reverse_listener_serves_cli(proxy_factory: Callable[..., Proxy]) -> None:
    # A router default backend matches every request; the CLI's rerouted flow must not be routed.
    p = proxy_factory(
        options={
            **BASE,
            "mode": "reverse:http://127.0.0.1:9@0",
            "connection_strategy": "lazy",
            "routing_default_backend": "http://127.0.0.1:9",
        },
    )
    r = execute(p.port, sh("echo via reverse"), host="backend.example")
    assert r.status == 200, r.body
    assert r.text("stdout") == "via reverse\n"


def test_stderr_is_separate_and_exit_code_is_reported(cli: Cli) -> None:
    r = execute(cli.port, sh("echo out; echo err >&2; echo out2; exit 7"))
    assert r.text("stdout") == "out\nout2\n"
    assert r.text("stderr") == "err\n"
    e = r.exit
    assert (e["code"], e["signal"], e["outcome"], e["timed_out"]) == (7, None, "failed", False)
    assert e["duration_ms"] > 0
    # sampled from /proc: a command this short may end before a sample sees its memory
    assert e["max_rss_kb"] is None or e["max_rss_kb"] > 0


def test_death_by_signal_is_reported(cli: Cli) -> None:
    r = execute(cli.port, sh("kill -SEGV $$"))
    assert (r.exit["code"], r.exit["signal"], r.exit["outcome"]) == (None, "SIGSEGV", "signaled")


def test_stream_false_returns_one_object(cli: Cli) -> None:
    r = execute(cli.port, sh("echo a; echo b >&2; sleep 0.7; exit 2", stream=False))
    assert r.status == 200 and r.headers["content-type"].startswith("application/json")
    # heartbeats are leading whitespace while the command is silent: still one JSON value
    assert r.body.startswith(b" ")
    body = r.json()
    assert body["stdout"] == "a\n" and body["stderr"] == "b\n"
    assert body["exit"]["code"] == 2 and body["pid"] > 0


def test_heartbeats_while_silent(cli: Cli) -> None:
    r = execute(cli.port, sh("sleep 1.2; echo done"))
    assert len(r.of("heartbeat")) >= 2
    assert r.text("stdout") == "done\n"


def test_binary_output_is_base64_and_exact(cli: Cli) -> None:
    r = execute(cli.port, sh(r"printf 'ok \303\251\n'; printf '\377\376\000x'"))
    pieces = r.of("stdout")
    raw = b"".join(
        p["data"].encode() if "data" in p else base64.b64decode(p["data_base64"]) for p in pieces
    )
    assert raw == "ok é\n".encode() + b"\xff\xfe\x00x"
    assert any("data_base64" in p for p in pieces)


# --- stdin ---------------------------------------------------------------------------------


def test_stdin_field(cli: Cli) -> None:
    r = execute(cli.port, {"command": "cat", "stdin": "hello\nworld\n"})
    assert r.text("stdout") == "hello\nworld\n" and r.exit["code"] == 0
    r = execute(
        cli.port, {"command": "cat", "stdin_base64": base64.b64encode(b"\xff\x00").decode()}
    )
    assert base64.b64decode(r.of("stdout")[0]["data_base64"]) == b"\xff\x00"


@pytest.mark.parametrize("where", ["proxy", "management"])
def test_request_body_streams_into_stdin(cli: Cli, where: str) -> None:
    """Bidirectional: each input line reaches the process while the request is still open."""
    port = cli.port if where == "proxy" else cli.mport
    s = Stream(port)
    try:
        s.send(
            json.dumps({"command": "cat", "stdin_stream": True, "stdin": "first\n"}).encode()
            + b"\n"
        )
        assert s.read_head()[0] == 200
        assert s.next_event()[1]["type"] == "start"  # type: ignore[index]
        got = s.next_event()
        assert got is not None and got[1] == {"type": "stdout", "data": "first\n", "seq": 1}
        for i in range(3):
            s.send(json.dumps({"stdin": f"line {i}\n"}).encode() + b"\n")
            while (ev := s.next_event()) is not None and ev[1]["type"] == "heartbeat":
                pass
            assert ev is not None and ev[1]["data"] == f"line {i}\n"  # echoed before we go on
        s.send(b'{"stdin_base64": "' + base64.b64encode(b"bin\n") + b'"}\n')
        s.end()
        rest = []
        while (ev := s.next_event()) is not None:
            rest.append(ev[1])
        assert "".join(e.get("data", "") for e in rest if e["type"] == "stdout") == "bin\n"
        assert rest[-1]["type"] == "exit" and rest[-1]["code"] == 0
    finally:
        s.close()


def test_bad_input_line_closes_stdin_and_says_so(cli: Cli) -> None:
    s = Stream(cli.port)
    s.send(b'{"command": "cat", "stdin_stream": true}\n{"stdin": 5}\n')
    s.end()
    r = s.reply()
    assert r.exit["code"] == 0 and "stdin" in r.exit["stdin_error"]


# --- limits and isolation -------------------------------------------------------------------


@pytest.mark.parametrize("trap, killed_by", [("", "SIGTERM"), ("trap '' TERM; ", "SIGKILL")])
def test_timeout_kills_the_whole_group_and_leaves_no_orphan(
    cli: Cli, trap: str, killed_by: str
) -> None:
    script = f"{trap}sleep 30 & sleep 30 & echo started; wait"
    r = execute(cli.port, sh(script, timeout=1))
    pid = r.of("start")[0]["pid"]
    assert r.text("stdout") == "started\n"
    e = r.exit
    assert e["timed_out"] is True and e["outcome"] == "timeout"
    assert e["signal"] == killed_by
    # SIGTERM at 1 s; when ignored, SIGKILL 0.5 s later
    assert 900 < e["duration_ms"] < (3000 if killed_by == "SIGTERM" else 4000), e
    # the exit event comes once the group got its SIGKILL; the kernel finishes it off at once
    assert wait_gone(pid, 2), group_members(pid)


def test_background_children_do_not_outlive_the_command(cli: Cli) -> None:
    r = execute(cli.port, sh("sleep 30 >/dev/null 2>&1 & echo $!"))
    assert r.exit["code"] == 0
    pid = r.of("start")[0]["pid"]
    assert wait_gone(pid, 2), group_members(pid)


@pytest.mark.skipif(not os.path.exists(PYTHON), reason="no python for the command user")
def test_memory_limit(cli: Cli) -> None:
    r = execute(cli.port, {"command": PYTHON, "args": ["-c", "x = bytearray(400 * 1024 * 1024)"]})
    assert r.exit["code"] == 1 and "MemoryError" in r.text("stderr")
    r = execute(cli.port, {"command": PYTHON, "args": ["-c", "x = bytearray(20 * 1024 * 1024)"]})
    assert r.exit["code"] == 0


def test_output_cap_truncates_and_stops_the_process(cli: Cli) -> None:
    r = execute(cli.port, {"command": "yes", "args": ["y"]})
    data = r.text("stdout")
    assert len(data) == 64 * 1024
    e = r.exit
    assert e["truncated"] is True and e["outcome"] == "output_limit"
    assert e["signal"] in ("SIGTERM", "SIGPIPE")


def test_environment_is_scrubbed_and_filtered(cli: Cli) -> None:
    r = execute(cli.port, {"command": "env", "env": {"GREETING": "hi there"}})
    lines = sorted(r.text("stdout").splitlines())
    assert lines == ["GREETING=hi there", "PATH=/usr/local/bin:/usr/bin:/bin"]


def test_working_directory_and_descriptors(cli: Cli) -> None:
    r = execute(cli.port, sh("pwd; ls /proc/self/fd | sort -n | tr '\\n' ' '"))
    out = r.text("stdout").splitlines()
    assert out[0] == "/"
    # 0, 1, 2 and the fd of `ls` reading the directory: nothing inherited from the proxy
    assert len(out[1].split()) <= 4, out


@pytest.mark.skipif(not ROOT_USER, reason="the user drop applies when the proxy is root")
def test_runs_as_the_unprivileged_user_when_root(cli: Cli) -> None:
    r = execute(cli.port, {"command": "id", "args": ["-u"]})
    assert r.text("stdout") == "65534\n"


def test_no_shell_metacharacter_is_interpreted(cli: Cli, tmp_path: Path) -> None:
    target = str(tmp_path / "x")  # what a shell would create with `> target`
    args = ["$(id)", "`id`", "a;b", "|", "&&", "*", "~", "$HOME", ">", target, "'q'", "\\"]
    r = execute(cli.port, {"command": "echo", "args": args})
    assert r.text("stdout") == " ".join(args) + "\n"
    assert not os.path.exists(target)
    # a command line with spaces is one (unknown) name, never split
    r = execute(cli.port, {"command": "echo hi; id"})
    assert r.status == 403 and r.json()["error"]["code"] == "COMMAND_NOT_ALLOWED"


def test_client_disconnect_kills_the_group_at_once(cli: Cli) -> None:
    for port in (cli.port, cli.mport):
        s = Stream(port, json.dumps(sh("sleep 30 & echo go; wait")).encode())
        pid = s.next_event()[1]["pid"]  # type: ignore[index]
        assert s.next_event()[1]["data"] == "go\n"  # type: ignore[index]
        assert group_members(pid)
        s.close()
        assert wait_gone(pid, 3), f"group {pid} still alive after the client left ({port})"


# --- refusals ------------------------------------------------------------------------------


def test_arguments_stay_in_the_working_directory(proxy_factory: Callable[..., Proxy]) -> None:
    """With a directory of its own, `cat ../../etc/passwd` is refused before anything runs; a
    file inside is served, and an argument rule's `paths: any` lets echo name any path."""
    wd = tempfile.mkdtemp(prefix="waypost-cli-")  # readable by the user commands run as
    try:
        os.chmod(wd, 0o755)
        note = Path(wd, "note.txt")
        note.write_text("inside\n")
        note.chmod(0o644)
        os.symlink("/etc", os.path.join(wd, "etc"))
        rules = {"id": {"patterns": ["-[ugn]+"], "max_args": 2}, "echo": {"paths": "any"}}
        c = start(proxy_factory, cli_working_directory=wd, cli_argument_rules=json.dumps(rules))
        for args in (["../../etc/passwd"], ["/etc/passwd"], ["etc/passwd"], ["-f=/etc/passwd"]):
            r = execute(c.port, {"command": "cat", "args": args})
            assert _refusal(r) == (403, "COMMAND_NOT_ALLOWED"), args
            assert "outside the working directory" in r.json()["error"]["message"]
            assert not r.events
        assert (
            execute(c.port, {"command": "cat", "args": ["note.txt"]}).text("stdout") == "inside\n"
        )
        r = execute(c.port, {"command": "echo", "args": ["/etc/passwd"]})
        assert r.text("stdout") == "/etc/passwd\n"
    finally:
        shutil.rmtree(wd)


def _refusal(r: Any) -> tuple[int, str]:
    return r.status, r.json()["error"]["code"]


@pytest.mark.parametrize(
    "kwargs, payload, status, code",
    [
        ({"token": None}, sh("id"), 401, "UNAUTHORIZED"),
        ({"token": "wrong"}, sh("id"), 403, "ACCESS_DENIED"),
        ({"method": "PUT"}, sh("id"), 405, "METHOD_NOT_ALLOWED"),
        ({"content_type": "text/plain"}, sh("id"), 415, "UNSUPPORTED_MEDIA_TYPE"),
        ({"content_type": None}, sh("id"), 415, "UNSUPPORTED_MEDIA_TYPE"),
        ({}, b"{not json", 400, "BAD_REQUEST"),
        ({}, b"[1, 2]", 400, "BAD_REQUEST"),
        ({}, {"command": "sh", "shell": True}, 400, "BAD_REQUEST"),
        ({}, {"command": "rm", "args": ["-rf", "/"]}, 403, "COMMAND_NOT_ALLOWED"),
        ({}, {"command": "/bin/rm"}, 403, "COMMAND_NOT_ALLOWED"),
        ({}, {"command": "/bin/../bin/sh"}, 403, "COMMAND_NOT_ALLOWED"),
        ({}, {"command": "../../bin/sh"}, 403, "COMMAND_NOT_ALLOWED"),
        ({}, {"command": "bin/sh"}, 403, "COMMAND_NOT_ALLOWED"),
        ({}, {"command": "/usr/bin/sh"}, 403, "COMMAND_NOT_ALLOWED"),
        ({}, {"command": "sh\n"}, 400, "BAD_REQUEST"),
        ({}, {"command": "sh\u0000"}, 400, "BAD_REQUEST"),
        ({}, {"command": ""}, 400, "BAD_REQUEST"),
        ({}, {"command": "echo", "args": "a b"}, 400, "BAD_REQUEST"),
        ({}, {"command": "echo", "args": ["a\u0000b"]}, 400, "BAD_REQUEST"),
        ({}, {"command": "id", "args": ["--help"]}, 403, "COMMAND_NOT_ALLOWED"),
        ({}, {"command": "id", "args": ["-u", "-g", "-n"]}, 403, "COMMAND_NOT_ALLOWED"),
        ({}, {"command": "env", "env": {"LD_PRELOAD": "/tmp/x.so"}}, 400, "BAD_REQUEST"),
        ({}, {"command": "env", "env": {"PYTHONSTARTUP": "/tmp/x"}}, 400, "BAD_REQUEST"),
        ({}, {"command": "env", "env": {"PATH": "/tmp"}}, 400, "BAD_REQUEST"),
        ({}, {"command": "env", "env": {"HOME": "/tmp"}}, 400, "BAD_REQUEST"),
        ({}, {"command": "env", "env": {"LANG": 1}}, 400, "BAD_REQUEST"),
        ({}, {"command": "echo", "timeout": -1}, 400, "BAD_REQUEST"),
        ({}, {"command": "echo", "stream": "yes"}, 400, "BAD_REQUEST"),
        (
            {},
            b'{"command": "cat", "stdin": "' + b"x" * (1024 * 1024) + b'"}',
            413,
            "PAYLOAD_TOO_LARGE",
        ),
    ],
)
def test_refusals(cli: Cli, kwargs: dict[str, Any], payload: Any, status: int, code: str) -> None:
    r = execute(cli.port, payload, **kwargs)
    assert _refusal(r) == (status, code), r.body
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    if status == 405:
        assert r.headers["allow"] == "POST"


def test_argument_rules_allow_matching_arguments(cli: Cli) -> None:
    r = execute(cli.port, {"command": "/usr/bin/id", "args": ["-un"]})
    assert r.exit["code"] == 0 and r.text("stdout").strip()


def test_concurrency_cap_refuses_the_eleventh_with_retry_after(
    proxy_factory: Callable[..., Proxy],
) -> None:
    c = start(proxy_factory, cli_max_concurrent=10)
    streams = []
    try:
        for _ in range(10):
            streams.append(Stream(c.port, json.dumps(sh("echo up; sleep 30")).encode()))
        # all ten run at once and stream
        for s in streams:
            assert s.next_event()[1]["type"] == "start"  # type: ignore[index]
            assert s.next_event()[1]["data"] == "up\n"  # type: ignore[index]
        assert "cli_processes 10.0" in c.metrics()
        r = execute(c.port, sh("echo eleventh"))
        assert _refusal(r) == (429, "RATE_LIMITED") and r.headers["retry-after"] == "1"
    finally:
        for s in streams:
            s.close()
    deadline = time.monotonic() + 5
    while "cli_processes 0.0" not in c.metrics():
        assert time.monotonic() < deadline, "slots were not freed after the clients left"
        time.sleep(0.05)
    assert execute(c.port, sh("echo again")).text("stdout") == "again\n"
    metrics = c.metrics()
    assert 'cli_executions_total{command="/bin/sh",outcome="rate_limited"} 1.0' in metrics
    assert 'cli_executions_total{command="/bin/sh",outcome="disconnected"} 10.0' in metrics


def test_off_without_token_and_disabled(proxy_factory: Callable[..., Proxy]) -> None:
    p = proxy_factory(options={**BASE, "cli_token": ""})
    mport = int(p.wait_for(MANAGEMENT).group(1))
    # not served: the proxy port treats it as any request addressed to itself (502), the
    # management port does not know the path
    r = execute(p.port, sh("id"))
    assert r.status in (403, 502) and not r.events  # egress: loopback / self-connect guard
    assert _refusal(execute(mport, sh("id"))) == (404, "NOT_FOUND")


def test_cli_token_from_the_environment(proxy_factory: Callable[..., Proxy]) -> None:
    p = proxy_factory(options={**BASE, "cli_token": ""}, env={"CLI_TOKEN": "from-env"})
    assert execute(p.port, sh("echo ok"), token="from-env").text("stdout") == "ok\n"


def test_loads_alone_with_flat_options(proxy_factory: Callable[..., Proxy]) -> None:
    options = {k: v for k, v in BASE.items() if k.startswith("cli_")}
    p = proxy_factory(scripts=("addons/cli.py",), options=options)
    assert execute(p.port, sh("echo alone")).text("stdout") == "alone\n"


def test_works_without_the_management_app(proxy_factory: Callable[..., Proxy]) -> None:
    p = proxy_factory(options={**BASE, "metrics_enabled": False})
    assert execute(p.port, sh("echo standalone")).text("stdout") == "standalone\n"


# --- the reroute cannot be abused ------------------------------------------------------------


def test_clients_cannot_reach_the_management_port_or_the_cli_listener(cli: Cli) -> None:
    for port, path in ((cli.mport, "/metrics"), (cli.internal, "/cli/execute")):
        target = f"http://127.0.0.1:{port}{path}"
        resp = raw_request(
            cli.port,
            f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
            "Content-Length: 2\r\n\r\n{}".encode(),
        )
        assert status_of(resp) == 403 and json_body(resp)["error"]["code"] == "ACCESS_DENIED"
    # the internal listener itself wants the per-process secret the reroute adds
    r = execute(cli.internal, sh("id"))
    assert _refusal(r) == (404, "NOT_FOUND")
    r = execute(cli.internal, sh("id"), extra={"X-Waypost-Cli-Internal": "guess"})
    assert _refusal(r) == (404, "NOT_FOUND")


def test_metrics_and_one_log_event_without_secrets(cli: Cli) -> None:
    r = execute(
        cli.port,
        {"command": "cat", "stdin": "SECRET-STDIN\n", "env": {"LANG": "SECRET-ENV"}},
        extra={"X-Request-ID": "cli-log-test-1"},
    )
    assert r.exit["code"] == 0
    line = cli.proxy.wait_for(r'"message":"cli execution".*cli-log-test-1')
    event = json.loads(line.string)
    assert event["command"] == "/bin/cat" and event["outcome"] == "ok"
    assert event["env_names"] == ["LANG"] and event["stdin_bytes"] == 13
    assert event["duration_ms"] > 0 and event["code"] == 0
    logged = "\n".join(cli.proxy.lines)
    assert "SECRET-STDIN" not in logged and "SECRET-ENV" not in logged
    m = cli.metrics()
    assert re.search(r'cli_executions_total\{command="/bin/cat",outcome="ok"\} [1-9]', m)
    assert "cli_processes 0.0" in m


def test_ten_concurrent_streams_all_stream_in_real_time(cli: Cli) -> None:
    """10+ concurrent streams, each getting its lines as they are printed."""
    results: list[Any] = [None] * 12
    script = "for i in 1 2 3 4; do echo $i; sleep 0.3; done"

    def one(i: int) -> None:
        results[i] = execute(cli.port, sh(script))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for r in results[:10]:
        assert r is not None and r.status == 200
        times = [t for t, e in r.events if e["type"] == "stdout"]
        # 0.9 s apart when printed; bunched into one read they would be ~0 apart
        assert len(times) == 4 and times[-1] - times[0] > 0.45, times
        assert r.exit["code"] == 0
