"""Shared fixtures: a real local backend and real mitmdump processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from aiohttp import web

# The redis_server fixture (a real redis-server on a free port) for every test that shares state.
pytest_plugins = ["tests.redis_helpers"]

ROOT = Path(__file__).resolve().parent.parent
MITMDUMP = str(Path(sys.executable).with_name("mitmdump"))
# Forward mode logs "HTTP(S) proxy listening at ...", reverse mode "Reverse proxy to URL listening at".
_LISTENING = re.compile(r"(?i)proxy (?:to \S+ )?listening at \*?\[?([0-9a-f.:]+?)\]?:(\d+)")
MANAGEMENT = re.compile(r"management (?:app )?listening at https?://[0-9.]+:(\d+)")
# A profile's reverse listener: mitmproxy 12 logs the command line's listener before it.
REVERSE = re.compile(r"(?i)reverse proxy to \S+ listening at \*?\[?([0-9a-f.:]+?)\]?:(\d+)")

T = TypeVar("T")


# --- backend -------------------------------------------------------------------------------


@dataclass
class Backend:
    host: str
    port: int
    hits: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _backend_app(state: Backend) -> web.Application:
    async def count(request: web.Request) -> None:
        state.hits[request.path] = state.hits.get(request.path, 0) + 1

    async def echo(request: web.Request) -> web.Response:
        await count(request)
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "version": f"{request.version.major}.{request.version.minor}",
                "headers": [[k, v] for k, v in request.raw_headers_decoded()],
                "body_length": len(body),
            }
        )

    async def status(request: web.Request) -> web.Response:
        await count(request)
        return web.Response(status=int(request.match_info["code"]), text="status\n")

    async def slow(request: web.Request) -> web.Response:
        await count(request)
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        return web.Response(text="slow\n")

    async def nbytes(request: web.Request) -> web.Response:
        await count(request)
        return web.Response(body=b"x" * int(request.match_info["n"]))

    async def stream(request: web.Request) -> web.StreamResponse:
        await count(request)
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(int(request.query.get("n", "5"))):
            await resp.write(f"chunk {i}\n".encode())
            await asyncio.sleep(int(request.query.get("ms", "100")) / 1000)
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/slow/{ms}", slow)
    app.router.add_route("*", "/bytes/{n}", nbytes)
    app.router.add_route("*", "/stream", stream)
    return app


def _raw_headers_decoded(self: web.Request) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers]


web.Request.raw_headers_decoded = _raw_headers_decoded  # type: ignore[attr-defined]


@contextlib.contextmanager
def serve_app(app: web.Application) -> Iterator[int]:
    """Serve an aiohttp app on 127.0.0.1 in its own thread and loop; yields its port."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner = web.AppRunner(app, access_log=None)
    port = 0

    async def start() -> None:
        nonlocal port
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)


@pytest.fixture(autouse=True)
def _no_stale_mitmproxy_log_handler() -> None:
    """A mitmproxy master made in-process by an earlier test (taddons, validate-config) can
    leave its log handler on the root logger; once its loop is closed, any later WARNING
    raises "Event loop is closed" in whatever test logs it (seen on mitmproxy 12)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        loop = getattr(getattr(handler, "master", None), "event_loop", None)
        if loop is not None and loop.is_closed():
            root.removeHandler(handler)


@pytest.fixture(autouse=True)
def _memory_state() -> None:
    """Each test starts with the process's shared state on the memory backend: a test that
    configured Redis through taddons must not leave it to the next one in the same process."""
    from addons import state

    if state.STATE.backend != "memory":
        try:
            state.STATE.close()
        except RuntimeError:
            pass  # its tasks belonged to a loop that is closed now
        state.STATE.backend = "memory"


@pytest.fixture(autouse=True)
def _no_kernel_registrations() -> None:
    """Each test starts without admission gates or own paths: what an addon a taddons test
    configured (and never ended) registered must not change how the next test's requests
    are taken in the same process."""
    from addons.kernel import admission, endpoints

    admission._gates.clear()
    endpoints._own_paths.clear()


@pytest.fixture(scope="session")
def backend() -> Iterator[Backend]:
    """An aiohttp origin on 127.0.0.1 in its own thread and loop, shared by the session."""
    state = Backend("127.0.0.1", 0)
    with serve_app(_backend_app(state)) as state.port:
        yield state


def read_head(sock: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes] | None:
    """Read until a blank line ends a message head: (head without the blank line, the bytes
    after it), or None if the peer closes first. `buf` holds bytes already read; the
    socket's timeout applies to every read."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


class ThreadedServer:
    """A raw TCP server on 127.0.0.1 for tests that need their own origin; subclasses answer
    each accepted connection in `handle`, on a thread of its own, with a 5 s socket timeout."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepts += 1
            conn.settimeout(5)
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# --- mitmdump --------------------------------------------------------------------------------


class Proxy:
    """A running `mitmdump` subprocess with its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        self.host = "127.0.0.1"

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float = 15, start: int = 0
    ) -> re.Match[str]:
        """Wait for an output line matching `pattern` (searched in lines from index `start`)."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    i += 1
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise TimeoutError(
                        f"no line matching {rx.pattern!r}; output:\n" + "\n".join(self.lines[-60:])
                    )
                self._cond.wait(min(left, 0.2))

    def json_lines(self) -> list[dict]:
        out = []
        for line in list(self.lines):
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode


def start_proxy(
    tmp_path: Path,
    *,
    scripts: tuple[str, ...] = ("addons/bundle.py",),
    options: dict[str, object] | None = None,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> Proxy:
    """Start mitmdump on 127.0.0.1 with an ephemeral port and wait until it listens."""
    confdir = tmp_path / "confdir"
    confdir.mkdir(exist_ok=True)
    args = [MITMDUMP, "--listen-host", "127.0.0.1", "-p", "0", "--set", f"confdir={confdir}"]
    for s in scripts:
        args += ["-s", str(ROOT / s)]
    for key, value in (options or {}).items():
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, bool):
                v = "true" if v else "false"
            args += ["--set", f"{key}={v}"]
    args += list(extra_args)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WAYPOST_")}
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    proxy = Proxy(args, full_env, ROOT)
    if wait:
        try:
            m = proxy.wait_for(_LISTENING)
        except TimeoutError:
            proxy.stop()
            raise
        proxy.port = int(m.group(2))
    return proxy


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator:
    """Start mitmdump processes for one test; all are stopped (SIGTERM, by PID) afterwards."""
    started: list[Proxy] = []

    def factory(**kwargs: object) -> Proxy:
        p = start_proxy(tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(p)
        return p

    yield factory
    for p in started:
        p.stop()


def raw_request(port: int, data: bytes, timeout: float = 5.0, host: str = "127.0.0.1") -> bytes:
    """Send raw bytes to the proxy and return everything it answers until it closes or idles."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        except TimeoutError:
            pass
        return b"".join(chunks)


def _complete(resp: bytes) -> bool:
    head, _, rest = resp.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return bool(m) and len(rest) >= int(m.group(1))


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes the connection (raises on timeout)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def open_tunnel(proxy_port: int, target: str) -> tuple[socket.socket, bytes]:
    """A socket with an established CONNECT tunnel to `target` (host:port), and the tunnel's
    bytes read with the 200 (a server that speaks first may already have)."""
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    got = read_head(s)
    assert got is not None, "closed before the CONNECT answer"
    assert status_of(got[0]) == 200, got[0]
    return s, got[1]


def connect_tunnel(proxy_port: int, target: str) -> socket.socket:
    """A socket with an established CONNECT tunnel to `target`, to a client-first protocol:
    nothing may arrive with the 200."""
    s, early = open_tunnel(proxy_port, target)
    assert not early, early
    return s


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Call `predicate` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def status_of(resp: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", resp)
    assert m, f"not an HTTP response: {resp[:200]!r}"
    return int(m.group(1))


def json_body(resp: bytes) -> dict:
    return json.loads(resp.partition(b"\r\n\r\n")[2])
