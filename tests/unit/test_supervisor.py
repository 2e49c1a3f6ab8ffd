"""The supervisor's pure parts (settings, crash guard) and the supervisor itself over stand-in
workers: small Python processes, started and ended by the supervisor under test, that answer
on the management socket it hands them. The instance app here is a local test app (the real
one is addons/supervisor/instance.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from mitmproxy.exceptions import OptionsError
from mitmproxy.test import taddons
from pydantic import ValidationError

from addons import schema
from addons.drain import Drain
from addons.kernel.logformat import JsonFormatter
from addons.kernel.units import parse_workers
from addons.schema.models import Server
from addons.supervisor import supervise
from addons.supervisor.__main__ import main as supervisor_main
from addons.supervisor.settings import Settings, SettingsError, resolve, set_options
from addons.supervisor.supervise import CrashGuard, Supervisor, describe, instance_url, listening

# --- server.workers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1), ("4", 4), (" 16 ", 16), ("auto", "auto"), ("AUTO", "auto")],
)
def test_parse_workers(value: str | int, expected: int | str) -> None:
    assert parse_workers(value) == expected


@pytest.mark.parametrize("value", [0, "0", -1, "many", "2.5", "", True])
def test_parse_workers_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="number of workers"):
        parse_workers(value)  # type: ignore[arg-type]


def test_profile_key_and_option() -> None:
    assert Server().workers == 1
    assert Server(workers="auto").workers == "auto"
    assert Server(workers="3").workers == 3
    with pytest.raises(ValidationError, match="number of workers"):
        Server(workers=0)
    assert schema.to_options(schema.Profile())["server_workers"] == "1"


def test_worker_option_is_checked_and_only_reported(caplog: pytest.LogCaptureFixture) -> None:
    drain = Drain()
    with taddons.context(drain) as tctx:
        with pytest.raises(OptionsError, match="server_workers: expected a number of workers"):
            tctx.configure(drain, server_workers="none")
        with caplog.at_level(logging.WARNING, "waypost.drain"):
            tctx.configure(drain, server_workers="auto")
    assert "not started by the supervisor" in caplog.text


def test_help_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert supervisor_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m addons.supervisor [mitmdump arguments...]")
    assert "server.workers" in out and "SO_REUSEPORT" in out


# --- settings ------------------------------------------------------------------------------


def test_set_options() -> None:
    argv = ["-s", "a.py", "--set", "server_workers=3", "--set=metrics_port=0", "--set", "x"]
    assert set_options(argv) == {"server_workers": "3", "metrics_port": "0", "x": "true"}
    assert set_options(["--set=a=1", "--set", "a=2", "--set"]) == {"a": "2"}  # the last wins


def _profile(tmp_path: Path, text: str) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_resolve_profile_env_then_command_line(tmp_path: Path) -> None:
    path = _profile(
        tmp_path,
        """\
        server: {workers: 3, shutdown_timeout: 7s}
        metrics: {host: 0.0.0.0, port: 9191, path: /m}
        """,
    )
    argv = ["--set", f"waypost_profile={path}"]
    s = resolve(argv, {}, cores=8)
    assert (s.workers, s.shutdown_timeout) == (3, 7.0)
    assert (s.metrics_enabled, s.metrics_host, s.metrics_port, s.metrics_path) == (
        True,
        "0.0.0.0",
        9191,
        "/m",
    )
    assert s.options["server_workers"] == "3"
    assert resolve(argv, {"WAYPOST_SERVER__WORKERS": "auto"}, cores=8).workers == 8
    s = resolve(
        [*argv, "--set", "server_workers=2", "--set", "metrics_enabled=false"],
        {"WAYPOST_SERVER__WORKERS": "auto"},
        cores=8,
    )
    assert (s.workers, s.metrics_enabled) == (2, False)
    # WAYPOST_PROFILE when no --set names one
    assert resolve([], {"WAYPOST_PROFILE": path}, cores=8).workers == 3


def test_resolve_refuses_a_bad_profile_with_its_line(tmp_path: Path) -> None:
    path = _profile(tmp_path, "server:\n  workers: 0\n")
    with pytest.raises(SettingsError) as e:
        resolve(["--set", f"waypost_profile={path}"], {}, cores=2)
    assert f"{path}:2: server.workers:" in str(e.value)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("server_workers=zero", "server_workers: expected a number of workers"),
        ("metrics_enabled=maybe", "metrics_enabled: expected true or false"),
        ("metrics_port=70000", "metrics_port: 70000 is not a TCP port"),
        ("server_shutdown_timeout=soon", "server_shutdown_timeout: expected a duration"),
    ],
)
def test_resolve_refuses_a_bad_command_line(tmp_path: Path, option: str, message: str) -> None:
    path = _profile(tmp_path, "server: {workers: 2}\n")
    with pytest.raises(SettingsError, match=message):
        resolve(["--set", f"waypost_profile={path}", "--set", option], {}, cores=2)


# --- pure parts ----------------------------------------------------------------------------


def test_crash_guard_stops_a_worker_that_never_listened() -> None:
    assert CrashGuard().exited(0.0, listened=False) == "before it ever listened"


def test_crash_guard_counts_exits_in_a_window() -> None:
    guard = CrashGuard(limit=5, window=30.0)
    assert [guard.exited(t, listened=True) for t in (0, 1, 2, 3)] == [None] * 4
    assert guard.exited(29.0, listened=True) == "the 5th worker exit within 30s"
    spread = CrashGuard(limit=5, window=30.0)
    assert all(spread.exited(t * 8.0, listened=True) is None for t in range(20))


@pytest.mark.parametrize(
    ("code", "text"), [(1, "code 1"), (0, "code 0"), (-9, "signal SIGKILL"), (-40, "signal 40")]
)
def test_describe(code: int, text: str) -> None:
    assert describe(code) == text


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:9090"),
        ("0.0.0.0", "http://127.0.0.1:9090"),
        ("::", "http://[::1]:9090"),
        ("10.1.2.3", "http://10.1.2.3:9090"),
    ],
)
def test_instance_url(host: str, url: str) -> None:
    assert instance_url(host, 9090) == url


def _socket_inodes() -> set[int]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir itself used
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


def test_listening_sees_this_process_listen() -> None:
    before = _socket_inodes()  # whatever other tests left open
    assert not listening(os.getpid(), before)
    with socket.create_server(("127.0.0.1", 0)) as sock:
        assert listening(os.getpid(), before)
        assert not listening(os.getpid(), before | {os.fstat(sock.fileno()).st_ino})


def test_json_lines_carry_the_worker_when_supervised(monkeypatch: pytest.MonkeyPatch) -> None:
    record = logging.LogRecord("waypost.x", logging.INFO, "", 0, "hello", (), None)
    assert "worker" not in json.loads(JsonFormatter().format(record))
    monkeypatch.setenv("WAYPOST_WORKERS", "3")
    monkeypatch.setenv("WAYPOST_WORKER", "2")
    assert json.loads(JsonFormatter().format(record))["worker"] == 2


# --- the supervisor over stand-in workers ---------------------------------------------------

# A stand-in worker: listens (like the proxy), answers "index pid instance-url" on its
# management socket, notes each SIGHUP in $HUPS; SIGTERM exits 0. `MODE` varies it.
STAND_IN = """
import os, signal, socket, sys, time
mode = os.environ.get("MODE", "")
if mode == "fail":
    sys.exit(3)
proxy = socket.create_server(("127.0.0.1", 0))
if mode == "crash":
    time.sleep(0.5)
    sys.exit(2)
me = os.environ["WAYPOST_WORKER"]
def hup(*_):
    with open(os.environ["HUPS"], "a") as f:
        f.write(me + "\\n")
signal.signal(signal.SIGHUP, hup)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else lambda *_: sys.exit(0))
mgmt = socket.socket(fileno=int(os.environ["WAYPOST_MANAGEMENT_FD"]))
mgmt.setblocking(True)
while True:
    conn, _ = mgmt.accept()
    conn.sendall(f"{me} {os.getpid()} {os.environ['WAYPOST_INSTANCE_MANAGEMENT']}".encode())
    conn.close()
"""


class LocalApp(Supervisor):
    """The supervisor with a test instance app that lists the workers it is given."""

    def instance_app(self) -> web.Application:
        async def views(request: web.Request) -> web.Response:
            return web.json_response([[s.index, s.pid, s.management] for s in self.slots])

        app = web.Application()
        app.router.add_get("/workers", views)
        return app


def settings(workers: int = 2, **changes: object) -> Settings:
    base = {
        "workers": workers,
        "metrics_enabled": True,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
        "metrics_path": "/metrics",
        "metrics_worker_label": False,
        "shutdown_timeout": 2.0,
        "options": {},
    }
    return Settings(**(base | changes))  # type: ignore[arg-type]


def stand_in(
    s: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str = ""
) -> Supervisor:
    monkeypatch.setenv("MODE", mode)
    monkeypatch.setenv("HUPS", str(tmp_path / "hups"))
    sup = LocalApp(s, [])
    sup.command = [sys.executable, "-c", STAND_IN]
    return sup


def ask(url: str) -> list[str]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as c:
        return c.recv(1000).decode().split()


async def until(predicate, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
    return value


def test_supervisor_runs_restarts_relays_and_drains(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sup = stand_in(settings(), monkeypatch, tmp_path)

    async def scenario() -> int:
        run = asyncio.create_task(sup.run())
        await until(lambda: all(s.listened for s in sup.slots))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{sup.instance_management}/workers") as r:
                views = await r.json()
        assert [v[0] for v in views] == [0, 1]
        assert [v[1] for v in views] == [s.proc.pid for s in sup.slots]  # type: ignore[union-attr]
        for index, pid, management in views:
            answer = await asyncio.to_thread(ask, management)
            assert answer == [str(index), str(pid), sup.instance_management]
        # A crashed worker is back within a second, on the same management socket.
        old = views[1][1]
        os.kill(old, signal.SIGKILL)
        t0 = time.monotonic()
        await until(lambda: sup.slots[1].pid not in (None, old))
        assert time.monotonic() - t0 < 1.0
        answer = await until(lambda: ask(views[1][2]))
        assert answer[:2] == ["1", str(sup.slots[1].pid)]
        await until(lambda: sup.slots[1].listened)
        sup.relay(signal.SIGHUP)
        hups = tmp_path / "hups"
        await until(lambda: hups.exists() and sorted(hups.read_text().split()) == ["0", "1"])
        sup.stop(signal.SIGTERM)
        return await run

    assert asyncio.run(scenario()) == 0
    assert all(s.proc.returncode == 0 for s in sup.slots)  # type: ignore[union-attr]


def test_a_worker_failing_before_it_listens_stops_the_instance(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sup = stand_in(settings(metrics_enabled=False), monkeypatch, tmp_path, mode="fail")
    assert asyncio.run(sup.run()) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("waypost supervisor: worker ")
    assert line.endswith("exited with code 3 before it ever listened: stopping the instance")


def test_workers_crashing_in_a_loop_stop_the_instance(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sup = stand_in(settings(metrics_enabled=False), monkeypatch, tmp_path, mode="crash")
    t0 = time.monotonic()
    assert asyncio.run(sup.run()) == 1
    assert time.monotonic() - t0 < 10
    assert "the 5th worker exit within 30s: stopping the instance" in capsys.readouterr().err


def test_a_worker_that_does_not_drain_is_killed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(supervise, "KILL_MARGIN", 0.5)
    s = settings(1, metrics_enabled=False, shutdown_timeout=0.0)
    sup = stand_in(s, monkeypatch, tmp_path, mode="stubborn")

    async def scenario() -> int:
        run = asyncio.create_task(sup.run())
        await until(lambda: sup.slots[0].listened)
        sup.stop(signal.SIGTERM)
        return await run

    t0 = time.monotonic()
    assert asyncio.run(scenario()) == 1
    assert time.monotonic() - t0 < 5
    assert sup.slots[0].proc.returncode == -signal.SIGKILL  # type: ignore[union-attr]


def test_a_taken_management_port_stops_the_instance_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        sup = stand_in(settings(metrics_port=port), monkeypatch, tmp_path)
        assert asyncio.run(sup.run()) == 1
    assert all(s.proc is None for s in sup.slots)  # no worker was started
    err = capsys.readouterr().err
    assert f"the management port cannot listen on 127.0.0.1:{port}: Address already in use" in err
