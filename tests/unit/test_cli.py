"""The CLI addon's decisions as tables, the addon through taddons, and Egress's CLI exemption."""

from __future__ import annotations

import base64
import json
import os
import signal
from typing import Any

import pytest
from mitmproxy import connection, exceptions
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow

from addons.clirun import addon as cli
from addons.clirun.endpoint import CLIENT_HEADER, INTERNAL_HEADER
from addons.clirun.options import parse_commands, parse_rules
from addons.clirun.plan import (
    SAFE_PATH,
    Refusal,
    Settings,
    env_refusal,
    limit_argv,
    outside,
    parse_input_line,
    parse_request,
)
from addons.clirun.runner import exit_fields, outcome_of, read_usage
from addons.clirun.stream import Utf8Chunks
from addons.egress import Egress
from addons.metrics import REGISTRY

COMMANDS = parse_commands(["/bin/echo", "/usr/bin/git", "/bin/sh"])
RULES = parse_rules(
    json.dumps(
        {"git": {"prefix": ["--no-pager"], "patterns": ["status|log", "-[a-z]+"], "max_args": 3}}
    ),
    COMMANDS,
)
S = Settings(
    enabled=True,
    token="t",
    commands=COMMANDS,
    rules=RULES,
    env_allowlist=frozenset({"LANG", "LD_LIBRARY_PATH"}),
    process_timeout=30.0,
)


def test_parse_commands() -> None:
    assert COMMANDS["echo"] == COMMANDS["/bin/echo"] == "/bin/echo"
    for bad, why in [
        ("echo", "absolute"),
        ("/bin/../bin/echo", "normalised"),
        ("/bin/", "normalised"),
        ("/usr/bin//echo", "normalised"),
        ("/bin/ec\nho", "control"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_commands([bad])
    with pytest.raises(ValueError, match="share the name 'echo'"):
        parse_commands(["/bin/echo", "/usr/local/bin/echo"])


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"ls": {}}', "not in cli_allowed_commands"),
        ('{"echo": {"patterns": ["("]}}', "not a regular expression"),
        ('{"echo": {"max_args": -1}}', "max_args"),
        ('{"echo": {"prefx": []}}', "prefx"),
    ],
)
def test_parse_rules_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_rules(text, COMMANDS)


@pytest.mark.parametrize(
    "name, refused",
    [
        ("LANG", False),
        ("GREETING_2", False),
        ("LD_PRELOAD", True),
        ("ld_preload", True),
        ("LD_LIBRARY_PATH", True),
        ("DYLD_INSERT_LIBRARIES", True),
        ("PYTHONPATH", True),
        ("PYTHONSTARTUP", True),
        ("PERL5OPT", True),
        ("NODE_OPTIONS", True),
        ("BASH_ENV", True),
        ("BASH_FUNC_x%%", True),
        ("IFS", True),
        ("PATH", True),
        ("GIT_SSH_COMMAND", True),
        ("1BAD", True),
        ("A=B", True),
        ("", True),
    ],
)
def test_env_refusal(name: str, refused: bool) -> None:
    assert (env_refusal(name) is not None) is refused


def _refusal(obj: Any) -> tuple[str, str]:
    with pytest.raises(Refusal) as e:
        parse_request(obj, S)
    return e.value.code, e.value.message


@pytest.mark.parametrize(
    "obj, code, fragment",
    [
        ([], "BAD_REQUEST", "JSON object"),
        ({"command": "echo", "cmd": 1}, "BAD_REQUEST", "Unknown field"),
        ({}, "BAD_REQUEST", "command must be"),
        ({"command": 5}, "BAD_REQUEST", "command must be"),
        ({"command": "echo\n"}, "BAD_REQUEST", "line break"),
        ({"command": "echo\x00"}, "BAD_REQUEST", "NUL"),
        ({"command": "cat"}, "COMMAND_NOT_ALLOWED", "not allowed"),
        ({"command": "/bin/cat"}, "COMMAND_NOT_ALLOWED", "not allowed"),
        ({"command": "/usr/bin/echo"}, "COMMAND_NOT_ALLOWED", "not allowed"),
        ({"command": "../bin/echo"}, "COMMAND_NOT_ALLOWED", "not allowed"),
        ({"command": "./echo"}, "COMMAND_NOT_ALLOWED", "not allowed"),
        ({"command": "echo hi"}, "COMMAND_NOT_ALLOWED", "not allowed"),
        ({"command": "echo", "args": ["a", 1]}, "BAD_REQUEST", "list of strings"),
        ({"command": "echo", "args": ["a\x00"]}, "BAD_REQUEST", "NUL"),
        ({"command": "git", "args": ["push"]}, "COMMAND_NOT_ALLOWED", "Argument 0"),
        ({"command": "git", "args": ["log", "-p", "-x", "-y"]}, "COMMAND_NOT_ALLOWED", "At most 3"),
        ({"command": "git", "args": ["log", "--exec=x"]}, "COMMAND_NOT_ALLOWED", "Argument 1"),
        ({"command": "echo", "env": {"HOME": "/"}}, "BAD_REQUEST", "not in the allowlist"),
        ({"command": "echo", "env": {"LD_LIBRARY_PATH": "/x"}}, "BAD_REQUEST", "never accepted"),
        ({"command": "echo", "env": {"LANG": None}}, "BAD_REQUEST", "must be a string"),
        ({"command": "echo", "env": []}, "BAD_REQUEST", "env must be"),
        ({"command": "echo", "stdin": 5}, "BAD_REQUEST", "stdin must be"),
        ({"command": "echo", "stdin_base64": "!!"}, "BAD_REQUEST", "not valid base64"),
        ({"command": "echo", "stdin": "a", "stdin_base64": ""}, "BAD_REQUEST", "not both"),
        ({"command": "echo", "stream": 1}, "BAD_REQUEST", "stream must be"),
        ({"command": "echo", "timeout": 0}, "BAD_REQUEST", "timeout"),
        ({"command": "echo", "timeout": True}, "BAD_REQUEST", "timeout"),
        ({"command": "echo", "timeout": "5"}, "BAD_REQUEST", "timeout"),
    ],
)
def test_parse_request_refusals(obj: Any, code: str, fragment: str) -> None:
    got_code, message = _refusal(obj)
    assert got_code == code and fragment in message


@pytest.mark.parametrize(
    "arg, out",
    [
        ("note.txt", False),
        ("sub/dir/../x", False),
        (".", False),
        ("~", False),  # no shell expands it: a name in the directory
        ("s/a/b/", False),
        ("http://example.com/x", False),
        ("..", True),
        ("../../etc/passwd", True),
        ("/etc/passwd", True),
        ("--file=/etc/passwd", True),
        ("--file=ok.txt", False),
        ("link", True),  # a symlink pointing out of the directory
    ],
)
def test_outside(tmp_path: Any, arg: str, out: bool) -> None:
    (tmp_path / "link").symlink_to("/etc")
    assert outside(arg, os.path.realpath(tmp_path)) is out


def test_paths_are_confined_unless_a_rule_allows_any(tmp_path: Any) -> None:
    rules = parse_rules(json.dumps({"echo": {"paths": "any"}}), COMMANDS)
    s = S._replace(working_directory=str(tmp_path))
    with pytest.raises(Refusal, match="Argument 1 names a path outside") as e:
        parse_request({"command": "sh", "args": ["x", "/etc/passwd"]}, s)
    assert e.value.code == "COMMAND_NOT_ALLOWED" and e.value.rule == "confine_paths"
    assert parse_request(
        {"command": "sh", "args": ["/etc/passwd"]}, s._replace(confine_paths=False)
    )
    assert parse_request({"command": "echo", "args": ["/etc"]}, s._replace(rules=rules)).argv == (
        "/etc",
    )
    assert parse_request({"command": "sh", "args": ["/etc/passwd"]}, S)  # "/" confines nothing


def test_parse_request_plans() -> None:
    p = parse_request({"command": "echo", "args": ["$(id)", "a b", ";"]}, S)
    assert p.path == "/bin/echo" and p.argv == ("$(id)", "a b", ";")
    assert p.env == {"PATH": SAFE_PATH} and p.stream is True and p.timeout == 30.0
    p = parse_request({"command": "/usr/bin/git", "args": ["log", "-p"], "timeout": 99}, S)
    assert p.argv == ("--no-pager", "log", "-p")  # the rule's fixed prefix comes first
    assert p.timeout == 30.0  # capped by process_timeout
    p = parse_request(
        {"command": "echo", "env": {"LANG": "C"}, "stdin_base64": "AAE=", "stream": False}, S
    )
    assert p.env["LANG"] == "C" and p.stdin == b"\x00\x01" and p.stream is False
    assert parse_request({"command": "echo", "timeout": 0.5}, S).timeout == 0.5


def test_limit_argv() -> None:
    assert limit_argv("/usr/bin/prlimit", S) == [
        "/usr/bin/prlimit", "--core=0", "--as=536870912", "--cpu=60:61", "--fsize=67108864",
        "--nproc=64", "--",
    ]  # fmt: skip
    none = Settings(max_memory=0, max_cpu_time=0, max_file_size=0, max_processes=0)
    assert limit_argv("/bin/prlimit", none) == ["/bin/prlimit", "--core=0", "--"]
    drop = Settings(max_memory=0, max_cpu_time=0, max_file_size=0, max_processes=0,
                    user=(65534, 65534), setpriv="/usr/bin/setpriv")  # fmt: skip
    assert limit_argv("/bin/prlimit", drop) == [
        "/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
        "/bin/prlimit", "--core=0", "--",
    ]  # fmt: skip


def test_read_usage_of_this_process_and_of_nothing() -> None:
    rss, cpu = read_usage(os.getpid())
    assert rss is not None and rss > 1000 and cpu is not None and cpu >= 0
    assert read_usage(2**22 + 12345) == (None, None)


def test_input_lines() -> None:
    assert parse_input_line(b'{"stdin": "a\\n"}') == b"a\n"
    assert parse_input_line(b'{"stdin_base64": "/w=="}') == b"\xff"
    for bad in (b"nope", b"[1]", b'{"data": "x"}', b'{"stdin": 1}'):
        with pytest.raises(ValueError):
            parse_input_line(bad)


def test_utf8_chunks_are_exact_and_never_split_a_character() -> None:
    dec = Utf8Chunks()
    text = "é€😀".encode()
    pieces = [dec.feed(text[i : i + 1]) for i in range(len(text))]
    assert "".join(p["data"] for p in pieces if p) == "é€😀"
    dec = Utf8Chunks()
    assert dec.feed(b"ok\xc3") == {"data": "ok"}  # the half character waits
    got = dec.feed(b"\xff")  # ... and turns out not to be UTF-8: bytes, held part included
    assert got == {"data_base64": base64.b64encode(b"\xc3\xff").decode()}
    assert dec.feed(b"fine") == {"data": "fine"}
    assert dec.feed(b"\xe2\x82", final=True) == {
        "data_base64": base64.b64encode(b"\xe2\x82").decode()
    }


def test_exit_fields_and_outcomes() -> None:
    assert exit_fields(None) == (None, None)
    assert exit_fields(3) == (3, None)
    assert exit_fields(-signal.SIGKILL) == (None, "SIGKILL")
    assert outcome_of(0, None, None, None) == "ok"
    assert outcome_of(2, None, None, None) == "failed"
    assert outcome_of(None, "SIGSEGV", None, None) == "signaled"
    assert outcome_of(None, "SIGKILL", "timeout", None) == "timeout"
    assert outcome_of(None, "SIGTERM", "output_limit", None) == "output_limit"
    assert outcome_of(None, "SIGKILL", "disconnected", None) == "disconnected"
    assert outcome_of(127, None, None, "ENOENT") == "error"


# --- the addon -------------------------------------------------------------------------------


def test_configure_validates_and_reads_cli_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    addon = cli.Cli()
    with taddons.context(addon) as tctx:
        for option, value, fragment in [
            ("cli_allowed_commands", ["sh"], "cli_allowed_commands: 'sh'"),
            ("cli_argument_rules", '{"x": {}}', "cli_argument_rules: 'x'"),
            ("cli_env_allowlist", ["LD_PRELOAD"], "cli_env_allowlist: 'LD_PRELOAD'"),
            ("cli_process_timeout", "soon", "cli_process_timeout"),
            ("cli_max_memory_per_process", "lots", "cli_max_memory_per_process"),
            ("cli_max_concurrent", 0, "cli_max_concurrent"),
            ("cli_working_directory", "relative", "cli_working_directory"),
            ("cli_run_as_user", "no-such-user-here", "cli_run_as_user"),
        ]:
            if option == "cli_run_as_user" and os.geteuid() != 0:
                continue  # only looked up when the proxy is root
            with pytest.raises(exceptions.OptionsError, match=fragment):
                tctx.configure(addon, **{option: value})
        monkeypatch.setenv("CLI_TOKEN", "from-env")
        tctx.configure(addon, cli_enabled=True, cli_allowed_commands=["/bin/echo"])
        assert addon.settings.token == "from-env" and addon.settings.active
        assert set(addon.management_routes()) == {"/cli/execute"}
        tctx.configure(addon, cli_enabled=False)
        assert addon.management_routes() == {}


def test_cli_processes_max_is_the_configured_limit() -> None:
    addon = cli.Cli()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, cli_max_concurrent=3)
        assert REGISTRY.get_sample_value("cli_processes_max") == 3
        assert REGISTRY.get_sample_value("cli_processes") == 0
        tctx.configure(addon, cli_max_concurrent=7)
        assert REGISTRY.get_sample_value("cli_processes_max") == 7


def _marked(addon: cli.Cli, f: tflow.HTTPFlow) -> bool:
    addon.requestheaders(f)
    return f.metadata.get("waypost", {}).get("local") == "cli"


def test_requestheaders_reroutes_only_its_own_path_addressed_to_the_proxy() -> None:
    addon = cli.Cli()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, cli_enabled=True, cli_token="t", cli_allowed_commands=["/bin/echo"])
        addon.listen_addrs = [("127.0.0.1", 4321)]  # as if running
        f = tflow.tflow()
        f.client_conn.sockname = ("127.0.0.1", 8080)
        f.request.host, f.request.port, f.request.path = "127.0.0.1", 8080, "/cli/execute?x=1"
        f.request.headers[INTERNAL_HEADER] = "client-made"
        assert _marked(addon, f)
        assert (f.request.host, f.request.port, f.request.scheme) == ("127.0.0.1", 4321, "http")
        assert f.request.headers[INTERNAL_HEADER] == addon._secret
        assert f.request.stream is True
        f.response = tflow.tresp()
        addon.responseheaders(f)
        assert f.response.stream is True

        # an origin behind the proxy with the same path is proxied, not taken
        f = tflow.tflow()
        f.client_conn.sockname = ("127.0.0.1", 8080)
        f.request.host, f.request.port, f.request.path = "example.com", 80, "/cli/execute"
        assert not _marked(addon, f) and f.request.host == "example.com"
        # other paths, answered flows, disabled addon: untouched
        f = tflow.tflow()
        f.client_conn.sockname = ("127.0.0.1", 8080)
        f.request.host, f.request.port, f.request.path = "127.0.0.1", 8080, "/cli/execute2"
        assert not _marked(addon, f)
        f = tflow.tflow(resp=True)
        f.client_conn.sockname = ("127.0.0.1", 8080)
        f.request.host, f.request.port, f.request.path = "127.0.0.1", 8080, "/cli/execute"
        assert not _marked(addon, f)
        tctx.configure(addon, cli_enabled=False)
        addon.listen_addrs = []
        f = tflow.tflow()
        f.client_conn.sockname = ("127.0.0.1", 8080)
        f.request.host, f.request.port, f.request.path = "127.0.0.1", 8080, "/cli/execute"
        assert not _marked(addon, f)


@pytest.mark.parametrize(
    "peer, xff, client",
    [
        ("10.1.2.3", None, "10.1.2.3"),
        ("::ffff:10.1.2.3", None, "10.1.2.3"),  # IPv4-mapped: the client IP every log names
        ("10.0.0.5", "203.0.113.9", "203.0.113.9"),  # behind a trusted proxy: the forwarded one
        ("10.1.2.3", "203.0.113.9", "10.1.2.3"),  # an untrusted peer's header is not believed
    ],
)
def test_reroute_names_the_client_ip(peer: str, xff: str | None, client: str) -> None:
    addon = cli.Cli()
    with taddons.context(addon) as tctx:
        tctx.configure(
            addon,
            cli_enabled=True,
            cli_token="t",
            cli_allowed_commands=["/bin/echo"],
            forwarding_trusted_proxies=["10.0.0.5/32"],
        )
        addon.listen_addrs = [("127.0.0.1", 4321)]
        f = tflow.tflow()
        f.client_conn.peername = (peer, 50000)
        f.client_conn.sockname = ("127.0.0.1", 8080)
        f.request.host, f.request.port, f.request.path = "127.0.0.1", 8080, "/cli/execute"
        if xff is not None:
            f.request.headers["X-Forwarded-For"] = xff
        assert _marked(addon, f)
        assert f.request.headers[CLIENT_HEADER] == client


# --- egress lets exactly the marked flows through ---------------------------------------------


class Cli:  # found by Egress as ctx.master.addons.get("cli")
    listen_addrs = [("127.0.0.1", 4321)]


def _flow(host: str, port: int, marked: bool) -> tflow.HTTPFlow:
    f = tflow.tflow()
    f.request.host, f.request.port = host, port
    if marked:
        f.metadata["waypost"] = {"local": "cli"}
    return f


async def test_egress_passes_marked_flows_to_the_cli_listener_only() -> None:
    egress = Egress()
    with taddons.context(egress, Cli()):
        f = _flow("127.0.0.1", 4321, marked=True)
        await egress.requestheaders(f)
        assert f.response is None
        data = server_hooks.ServerConnectionHookData(
            server=connection.Server(address=("127.0.0.1", 4321)), client=f.client_conn
        )
        await egress.server_connect(data)
        assert data.server.error is None

        # unmarked: the CLI listener is as unreachable as the management port
        f = _flow("127.0.0.1", 4321, marked=False)
        await egress.requestheaders(f)
        assert f.response is not None and f.response.status_code == 403
        assert f.metadata["waypost"]["rule"] == "management_port"
        other = server_hooks.ServerConnectionHookData(
            server=connection.Server(address=("127.0.0.1", 4321)), client=tflow.tclient_conn()
        )
        await egress.server_connect(other)
        assert other.server.error is not None

        # marked, but anywhere else: checked like any flow
        f = _flow("127.0.0.1", 22, marked=True)
        await egress.requestheaders(f)
        assert f.response is not None and f.response.status_code == 403
