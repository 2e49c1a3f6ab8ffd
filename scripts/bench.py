"""Loopback load test: bare mitmdump against the Waypost bundle, side by side.

Usually started through `scripts/bench`, which sets up the virtualenv first. Every process
listens on 127.0.0.1 only; everything started here is stopped by PID before exit.

    wrk (absolute-form GETs, keep-alive) -> mitmdump (-p 0) -> nginx (1 KB static file)

For each connection count the setups are run one after the other (interleaved, so drift on a
shared machine hits both alike), after one warm-up run per setup. Reported per run: req/s,
latency p50/p95/p99, wrk's non-2xx/3xx count and socket errors, requests nginx actually served,
the proxy's RSS and its CPU time per completed request (utime+stime from /proc/PID/stat), and
the req/s ratio of each setup to bare mitmdump.

The proxy inherits the environment, so `PYTHONOPTIMIZE=1 scripts/bench` measures what the
Docker image runs. Only the standard library is used here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin (scripts/bench runs us with the venv python)
PAGE = "/1k.bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGESIZE_KB = os.sysconf("SC_PAGESIZE") // 1024


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A setup could not start or a tool is missing: reported, then exit 1."""


# --- processes ---------------------------------------------------------------------------------


class Child:
    """A process we started (own session, so a terminal ^C reaches only us); stopped by PID."""

    def __init__(
        self,
        name: str,
        args: list[str],
        logfile: Path,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ):
        self.name = name
        self.args = args
        self.logfile = logfile
        self._out = open(logfile, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) still up {timeout:g}s after SIGTERM; killing")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._out.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets the process listens on (its fds + /proc/net/tcp{,6})."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                    continue
                hexaddr, hexport = cols[1].rsplit(":", 1)
                raw = bytes.fromhex(hexaddr)
                # /proc prints the address as native-endian 32-bit words
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((socket.inet_ntop(family, raw), int(hexport, 16)))
    return sorted(found, key=lambda a: a[1])


def is_loopback(addr: str) -> bool:
    return (
        addr.startswith("127.")
        or addr in ("::1", "::ffff:127.0.0.1")
        or addr.startswith("::ffff:127.")
    )


def fetch(url: str, proxy_port: int | None = None, timeout: float = 5) -> tuple[int, bytes]:
    """GET `url` directly or through the proxy (absolute-form); (status, body)."""
    proxies = {"http": f"http://127.0.0.1:{proxy_port}"} if proxy_port else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def proc_stat(pid: int) -> dict[str, float]:
    """CPU seconds (utime+stime, all threads), RSS and peak RSS (MB), open fds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                status[key] = int(value.split()[0]) / 1024
    return {
        "cpu_s": cpu,
        "rss_mb": status.get("VmRSS", 0.0),
        "hwm_mb": status.get("VmHWM", 0.0),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def listen_drops() -> int:
    """Kernel count of connections dropped at a full accept queue (TcpExt ListenDrops)."""
    with contextlib.suppress(OSError), open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
        for keys, values in zip(lines[::2], lines[1::2], strict=False):
            if keys.startswith("TcpExt:"):
                return int(dict(zip(keys.split(), values.split(), strict=False))["ListenDrops"])
    return 0


def loadavg() -> float:
    return os.getloadavg()[0]


# --- tools -------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def ensure_tools() -> tuple[str, str]:
    wrk, nginx = find_tool("wrk"), find_tool("nginx")
    missing = [n for n, p in (("wrk", wrk), ("nginx", nginx)) if not p]
    if missing:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise BenchError(
                f"missing {', '.join(missing)}: run as root or apt-get install {' '.join(missing)}"
            )
        log(f"installing {' '.join(missing)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            check=True,
            env=env,
            timeout=900,
        )
        wrk, nginx = find_tool("wrk"), find_tool("nginx")
        if not wrk or not nginx:
            raise BenchError("apt-get ran but wrk/nginx are still missing")
    return wrk, nginx  # type: ignore[return-value]


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def tool_version(args: list[str]) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (r.stdout + r.stderr).strip().splitlines()
    return out[0].strip() if out else "?"


# --- origin ------------------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile 16384;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
{user}
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {tmp}/www;
        location = /nginx_status {{ stub_status; }}
    }}
}}
"""


class Origin:
    def __init__(self, nginx: str, tmp: Path, size: int):
        self.nginx = nginx
        self.tmp = tmp
        www = tmp / "www"
        www.mkdir()
        (www / PAGE.lstrip("/")).write_bytes(os.urandom(size))
        self.child: Child | None = None
        self.port = 0

    def start(self) -> None:
        for _attempt in range(3):
            self.port = free_port()
            conf = self.tmp / "nginx.conf"
            # As root, nginx workers would switch to nobody, who cannot read the 0700 temp dir.
            user = "user root;" if os.geteuid() == 0 else ""
            conf.write_text(NGINX_CONF.format(tmp=self.tmp, port=self.port, user=user))
            self.child = Child(
                "nginx",
                [
                    self.nginx,
                    "-p",
                    str(self.tmp),
                    "-e",
                    str(self.tmp / "nginx-error.log"),
                    "-c",
                    str(conf),
                    "-g",
                    "daemon off;",
                ],
                self.tmp / "nginx.out",
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.child.alive():
                with contextlib.suppress(OSError):
                    status, body = fetch(self.url, timeout=2)
                    if status == 200:
                        log(
                            f"origin: nginx pid {self.child.pid} on 127.0.0.1:{self.port}, "
                            f"{len(body)} byte file"
                        )
                        return
                time.sleep(0.05)
            err = self.child.tail() + "\n" + _read(self.tmp / "nginx-error.log")
            self.child.stop()
            log(f"nginx did not start on port {self.port}, retrying:\n{err}")
        raise BenchError("nginx could not start (see above)")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PAGE}"

    def served(self) -> int:
        """nginx's total request counter (stub_status); the status request itself counts one."""
        _, body = fetch(f"http://127.0.0.1:{self.port}/nginx_status", timeout=5)
        return int(body.decode().splitlines()[2].split()[2])

    def stop(self) -> None:
        if self.child:
            self.child.stop()


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")[-3000:]
    except OSError:
        return ""


# --- proxies -----------------------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    scripts: list[str]
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    child: Child | None = None
    port: int = 0


def start_proxy(setup: Setup, tmp: Path, origin: Origin, timeout: float) -> None:
    confdir = tmp / f"confdir-{setup.name}"
    confdir.mkdir()
    args = [
        str(BIN / "mitmdump"),
        "--listen-host",
        "127.0.0.1",
        "-p",
        "0",
        "-q",
        "--set",
        "flow_detail=0",
        "--set",
        f"confdir={confdir}",
    ]
    for s in setup.scripts:
        args += ["-s", s]
    args += setup.args
    log(f"{setup.name}: {shlex.join(args)}")
    env = {**os.environ, **setup.env} if setup.env else None
    child = setup.child = Child(setup.name, args, tmp / f"{setup.name}.out", env)
    deadline = time.monotonic() + timeout
    answers: dict[int, str] = {}
    while time.monotonic() < deadline and child.alive():
        check_loopback(setup)
        ports = sorted({p for _, p in listening_sockets(child.pid)})
        for port in ports:
            try:
                status, body = fetch(origin.url, proxy_port=port, timeout=5)
            except OSError as e:
                answers[port] = repr(e)
                continue
            if status == 200 and len(body) == origin_size(origin):
                setup.port = port
                log(f"{setup.name}: pid {child.pid}, proxy port {port} (listening: {ports})")
                return
            answers[port] = f"HTTP {status} {body[:200]!r}"
        if len(ports) == 1 and ports[0] in answers and answers[ports[0]].startswith("HTTP"):
            setup.port = ports[0]
            log(
                f"WARNING {setup.name}: the smoke request through port {ports[0]} got "
                f"{answers[ports[0]]}; benchmarking anyway"
            )
            return
        time.sleep(0.1)
    why = (
        "exited"
        if not child.alive()
        else f"no proxy port answering within {timeout:.0f}s {answers}"
    )
    raise BenchError(f"{setup.name} did not start ({why}); its output:\n{child.tail()}")


def origin_size(origin: Origin) -> int:
    return (origin.tmp / "www" / PAGE.lstrip("/")).stat().st_size


def check_loopback(setup: Setup) -> None:
    assert setup.child is not None
    exposed = [f"{a}:{p}" for a, p in listening_sockets(setup.child.pid) if not is_loopback(a)]
    if exposed:
        raise BenchError(
            f"{setup.name} listens beyond loopback on {exposed}; stopped it "
            "(bind it to 127.0.0.1 with --proxy-args)"
        )


def settle(pid: int, baseline: int, timeout: float = 10) -> None:
    """Wait until the proxy has closed the previous run's connections: its fd count is back
    near the count it started with, or has stopped falling for half a second."""
    deadline = time.monotonic() + timeout
    last, stable = -1, 0
    while time.monotonic() < deadline:
        fds = proc_stat(pid)["fds"]
        if fds <= baseline + 4:
            return
        stable = stable + 1 if fds >= last >= 0 else 0
        if stable >= 5:
            return
        last = fds
        time.sleep(0.1)


# --- wrk ---------------------------------------------------------------------------------------

WRK_LUA = """\
-- Absolute-form requests through the proxy: wrk connects to the proxy, asks for the origin URL.
wrk.path = "{url}"
wrk.headers["Host"] = "{host}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WAYPOST_WRK {{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.max))
end
"""


def run_wrk(
    wrk: str, lua: Path, port: int, conns: int, threads: int, duration: float, timeout: str
) -> dict:
    threads = max(1, min(threads, conns))
    args = [
        wrk,
        "-t",
        str(threads),
        "-c",
        str(conns),
        "-d",
        f"{duration:g}s",
        "--timeout",
        timeout,
        "-s",
        str(lua),
        f"http://127.0.0.1:{port}/",
    ]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        raise BenchError(f"wrk did not finish: {shlex.join(args)}") from None
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    for line in out.splitlines():
        if line.startswith("WAYPOST_WRK "):
            return json.loads(line[len("WAYPOST_WRK ") :])
    raise BenchError(f"wrk gave no summary (exit {proc.returncode}):\n{out}")


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Row:
    setup: str
    connections: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    timeouts: int
    listen_drops: int
    origin_served: int
    rss_mb: float
    peak_rss_mb: float
    cpu_ms_per_req: float | None
    cpu_pct: float
    ratio: float | None = None
    reps: list[float] = field(default_factory=list)


def measure(
    setup: Setup,
    origin: Origin,
    wrk: str,
    lua: Path,
    conns: int,
    args: argparse.Namespace,
    baseline_fds: int,
) -> Row:
    assert setup.child is not None
    pid = setup.child.pid
    settle(pid, baseline_fds)
    check_loopback(setup)
    before, served0, drops0 = proc_stat(pid), origin.served(), listen_drops()
    t0 = time.monotonic()
    w = run_wrk(wrk, lua, setup.port, conns, args.threads, args.duration, args.timeout)
    wall = time.monotonic() - t0
    if not setup.child.alive():
        raise BenchError(
            f"{setup.name} died during the run at {conns} connections:\n{setup.child.tail()}"
        )
    after, served1, drops1 = proc_stat(pid), origin.served(), listen_drops()
    n = w["requests"]
    cpu = after["cpu_s"] - before["cpu_s"]
    return Row(
        setup=setup.name,
        connections=conns,
        rps=n / (w["duration_us"] / 1e6) if w["duration_us"] else 0.0,
        p50_ms=w["p50_us"] / 1000,
        p95_ms=w["p95_us"] / 1000,
        p99_ms=w["p99_us"] / 1000,
        requests=n,
        non_2xx=w["status"],
        socket_errors=w["connect"] + w["read"] + w["write"],
        timeouts=w["timeout"],
        listen_drops=drops1 - drops0,
        origin_served=served1 - served0 - 1,  # minus the first status request
        rss_mb=after["rss_mb"],
        peak_rss_mb=after["hwm_mb"],
        cpu_ms_per_req=cpu * 1000 / n if n else None,
        cpu_pct=100 * cpu / wall if wall else 0.0,
    )


def median_row(rows: list[Row]) -> Row:
    """The repetition with the median req/s (so every column comes from one real run)."""
    ordered = sorted(rows, key=lambda r: r.rps)
    row = ordered[(len(ordered) - 1) // 2]
    row.reps = [round(r.rps, 1) for r in rows]
    return row


def render(rows: list[Row], meta: dict) -> str:
    head = [
        "setup",
        "conns",
        "req/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "requests",
        "non-2xx",
        "errors",
        "SYN drops",
        "origin",
        "RSS MB",
        "CPU ms/req",
        "CPU %",
        "vs bare",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r.setup,
                str(r.connections),
                f"{r.rps:.0f}",
                f"{r.p50_ms:.1f}",
                f"{r.p95_ms:.1f}",
                f"{r.p99_ms:.1f}",
                str(r.requests),
                str(r.non_2xx),
                f"{r.socket_errors}+{r.timeouts}t" if r.timeouts else str(r.socket_errors),
                str(r.listen_drops),
                str(r.origin_served),
                f"{r.rss_mb:.0f}",
                "-" if r.cpu_ms_per_req is None else f"{r.cpu_ms_per_req:.2f}",
                f"{r.cpu_pct:.0f}",
                "-" if r.ratio is None else f"{r.ratio:.2f}x",
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    out = [
        f"nproc {meta['nproc']}, {meta['python']}, mitmproxy {meta['mitmproxy']}, "
        f"{meta['wrk']}, {meta['nginx']}",
        f"{meta['duration']:g}s per run, wrk threads {meta['threads']}, "
        f"{meta['size']} byte responses, keep-alive, "
        f"repetitions {meta['repeat']}, PYTHONOPTIMIZE={meta['pythonoptimize'] or '-'}, "
        f"load average {meta['load_start']:.2f} before / {meta['load_end']:.2f} after",
        "",
        line(head),
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *(line(b) for b in body),
        "",
        "non-2xx: wrk's count of responses >= 400; errors: connect+read+write socket errors",
        "(+t: timeouts); origin: requests nginx served in the run (fewer than requests: the proxy",
        "answered some itself); SYN drops: connections the kernel dropped at a full accept queue",
        "(machine-wide TcpExt ListenDrops during the run);",
        "RSS: proxy VmRSS after the run; CPU ms/req: proxy utime+stime / requests completed;",
        "CPU %: proxy CPU time / wall time of the run (well under 100 with a saturated proxy:",
        "something else had the core).",
    ]
    for name, s in meta["setups"].items():
        out.append(f"{name}: {s}")
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark bare mitmdump against the Waypost bundle on loopback "
        "(wrk -> proxy -> nginx). "
        "Run by hand; stops by itself. The proxy inherits the environment (try PYTHONOPTIMIZE=1).",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=10,
        help="seconds per measured run (default 10); at 1000 connections the connect storm "
        "(mitmdump listens with a backlog of 100) takes seconds, so give it 20 or more",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=3,
        help="seconds of warm-up per setup at 100 connections (default 3; 0 = none)",
    )
    p.add_argument(
        "--connections",
        default="10,100,1000",
        help="comma-separated connection counts (default 10,100,1000)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="wrk threads (default 1; the machine has few cores)"
    )
    p.add_argument("--timeout", default="10s", help="wrk per-request timeout (default 10s)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="repetitions per run; the median by req/s is reported (default 1)",
    )
    p.add_argument(
        "--size", type=int, default=1024, help="origin response size in bytes (default 1024)"
    )
    p.add_argument(
        "--profile",
        default="profiles/prod.yaml",
        help="profile for the bundle (default profiles/prod.yaml)",
    )
    p.add_argument(
        "--scripts",
        help="comma-separated addon files to bench instead of addons/bundle.py (no profile then)",
    )
    p.add_argument(
        "--no-bare", action="store_true", help="skip bare mitmdump (no ratio column then)"
    )
    p.add_argument("--no-waypost", action="store_true", help="bench bare mitmdump only")
    p.add_argument(
        "--proxy-args",
        default="",
        help="extra mitmdump arguments for the Waypost setup (shell-quoted string)",
    )
    p.add_argument(
        "--bare-args",
        default="",
        help="extra mitmdump arguments for bare mitmdump (shell-quoted string)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=30,
        help="seconds a proxy may take to start (default 30)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the results as JSON on stdout (the table goes to stderr)",
    )
    a = p.parse_args(argv)
    try:
        a.conn_list = [int(c) for c in a.connections.split(",") if c.strip()]
    except ValueError:
        p.error("--connections: comma-separated integers, e.g. 10,100,1000")
    if not a.conn_list or min(a.conn_list) < 1:
        p.error("--connections: at least one count >= 1")
    if a.duration <= 0 or a.repeat < 1 or a.threads < 1 or a.size < 1:
        p.error("--duration, --repeat, --threads and --size must be positive")
    if a.no_bare and a.no_waypost:
        p.error("nothing to bench: --no-bare and --no-waypost")
    return a


def build_setups(a: argparse.Namespace) -> list[Setup]:
    setups = []
    if not a.no_bare:
        setups.append(Setup("bare", [], shlex.split(a.bare_args)))
    if not a.no_waypost:
        # The loopback origin must be reachable (the egress addon blocks loopback by default) and
        # the management app must stay on loopback (the prod profile binds 0.0.0.0:9090).
        # mitmproxy keeps --set values of options no loaded addon declares, without complaint.
        # The environment too: the profile loader does not count a --set equal to the
        # option's default (metrics_host=127.0.0.1) as set, the environment wins over it.
        # The cache is off: nginx's static file would be a hit after the first request, and this
        # measures the pipeline on proxied requests (scripts/bench-cache measures the cache).
        mport = str(free_port())
        common = [
            "--set", "cache_enabled=false",
            "--set", "egress_allowed_networks=127.0.0.1/32",
            "--set", "metrics_host=127.0.0.1",
            "--set", f"metrics_port={mport}",
        ]  # fmt: skip
        env = {"METRICS_HOST": "127.0.0.1", "METRICS_PORT": mport}
        if a.scripts:
            files = [s.strip() for s in a.scripts.split(",") if s.strip()]
            for f in files:
                if not (ROOT / f).is_file():
                    raise BenchError(f"--scripts: {f} does not exist")
            setups.append(Setup("waypost", files, common + shlex.split(a.proxy_args), env))
        else:
            if not (ROOT / "addons/bundle.py").is_file():
                raise BenchError(
                    "addons/bundle.py does not exist yet: "
                    "pass --scripts addons/a.py,addons/b.py or --no-waypost"
                )
            if not (ROOT / a.profile).is_file():
                raise BenchError(f"profile {a.profile} does not exist (--profile)")
            args = ["--set", f"waypost_profile={a.profile}", *common, *shlex.split(a.proxy_args)]
            setups.append(Setup("waypost", ["addons/bundle.py"], args, env))
    return setups


def _on_sigterm(*_: object) -> None:
    log("SIGTERM: stopping everything started here")
    sys.exit(143)  # SystemExit unwinds through the finally blocks that stop the processes


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    setups = build_setups(a)
    wrk, nginx = ensure_tools()
    nofile = raise_nofile()
    if max(a.conn_list) + 100 > nofile:
        log(f"WARNING: open-files limit {nofile} is below {max(a.conn_list)} connections")
    import mitmproxy.version  # the venv's mitmproxy, the one mitmdump runs

    meta = {
        "nproc": os.cpu_count(),
        "python": f"Python {platform.python_version()}",
        "mitmproxy": mitmproxy.version.VERSION,
        "wrk": tool_version([wrk, "-v"]).split(" Copyright")[0],
        "nginx": tool_version([nginx, "-v"]).replace("nginx version: ", ""),
        "duration": a.duration,
        "threads": a.threads,
        "size": a.size,
        "repeat": a.repeat,
        "pythonoptimize": os.environ.get("PYTHONOPTIMIZE", ""),
        "nofile": nofile,
        "load_start": loadavg(),
        "load_end": 0.0,
        "setups": {},
    }
    if meta["load_start"] > 0.3 * (os.cpu_count() or 1):
        log(
            f"WARNING: load average {meta['load_start']:.2f} on {os.cpu_count()} cores: other work "
            "shares the CPUs, the numbers will be low and noisy"
        )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="waypost-bench-") as tmpdir:
        tmp = Path(tmpdir)
        origin = Origin(nginx, tmp, a.size)
        try:
            origin.start()
            lua = tmp / "absolute.lua"
            lua.write_text(WRK_LUA.format(url=origin.url, host=f"127.0.0.1:{origin.port}"))
            baselines = {}
            for s in setups:
                start_proxy(s, tmp, origin, a.start_timeout)
                assert s.child is not None
                meta["setups"][s.name] = shlex.join(s.child.args[1:])
                baselines[s.name] = proc_stat(s.child.pid)["fds"]
            if a.warmup > 0:
                for s in setups:
                    log(f"warm-up {s.name}: {a.warmup:g}s at 100 connections")
                    run_wrk(wrk, lua, s.port, 100, a.threads, a.warmup, a.timeout)
            for conns in a.conn_list:
                per_setup: dict[str, list[Row]] = {s.name: [] for s in setups}
                for _rep in range(a.repeat):
                    for s in setups:
                        r = measure(s, origin, wrk, lua, conns, a, baselines[s.name])
                        log(
                            f"{s.name:8} c={conns:<5} {r.rps:8.0f} req/s  p95 {r.p95_ms:7.1f} ms"
                            f"  non-2xx {r.non_2xx}  errors {r.socket_errors}+{r.timeouts}t"
                        )
                        per_setup[s.name].append(r)
                chosen = [median_row(per_setup[s.name]) for s in setups]
                bare = next((r for r in chosen if r.setup == "bare"), None)
                for r in chosen:
                    if bare and r is not bare and bare.rps:
                        r.ratio = r.rps / bare.rps
                rows.extend(chosen)
            for s in setups:
                assert s.child is not None
                meta["setups"][s.name] += f"  [peak RSS {proc_stat(s.child.pid)['hwm_mb']:.0f} MB]"
        finally:
            for s in setups:
                if s.child:
                    s.child.stop()
            origin.stop()
    meta["load_end"] = loadavg()
    table = render(rows, meta)
    if a.json:
        print(table, file=sys.stderr)
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, sys.stdout, indent=2)
        print()
    else:
        print(table)
    for r in rows:
        if r.requests == 0:
            log(
                f"note: {r.setup} c={r.connections}: no request completed within the run "
                "(connection setup took it all): lengthen --duration"
            )
    short = [r for r in rows if r.origin_served < r.requests - r.non_2xx - 1]
    for r in short:
        log(
            f"note: {r.setup} c={r.connections}: nginx served {r.origin_served} of "
            f"{r.requests - r.non_2xx} 2xx responses (answered by the proxy itself?)"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
