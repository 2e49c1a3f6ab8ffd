"""What the bench scripts share: processes stopped by PID, /proc readers (per process and per
process tree: a supervisor and its workers), tools, the nginx origin, mitmdump setups, the
every-policy profile, wrk runs, the paced (open-loop) client, medians, ratios and tables.

Every process started here listens on 127.0.0.1 only and is stopped by PID (`Child.stop`);
`run(main)` turns SIGTERM into an exit that unwinds through the scripts' `finally` blocks.
Only the standard library is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin (the wrappers run us with the venv python)
PAGE = "/1k.bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# mitmdump's startup lines (not printed with -q)
LISTENING = re.compile(r"proxy listening at [0-9.]+:(\d+)")
MANAGEMENT = re.compile(r"management listening at http://[0-9.]+:(\d+)")

T = TypeVar("T")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A setup could not start or a tool is missing: reported, then exit 1."""


def _on_sigterm(*_: object) -> None:
    log("SIGTERM: stopping everything started here")
    sys.exit(143)  # SystemExit unwinds through the finally blocks that stop the processes


def run(main: Callable[[list[str]], int]) -> NoReturn:
    """A bench script's entry point: exit with main's code; a BenchError is 1, ^C 130."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)


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

    def wait_for(self, *patterns: re.Pattern[str], timeout: float = 60) -> list[re.Match[str]]:
        """The first output line matching each pattern, once all have been printed."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.logfile.read_text(errors="replace")
            found = [p.search(text) for p in patterns]
            if all(found):
                return found  # type: ignore[return-value]
            if not self.alive() or time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not start; its output:\n{self.tail()}")
            time.sleep(0.05)

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


def run_tool(args: list[str], timeout: float) -> tuple[int, str]:
    """Run a load generator to the end: (exit code, its output); killed by PID on timeout."""
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{Path(args[0]).name} did not finish: {shlex.join(args)}") from None
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode, out


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


def wait_http(child: Child, url: str, timeout: float, interval: float = 0.05) -> bytes | None:
    """Poll `url` while `child` runs until it answers 200: its body, or None at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.alive():
        with contextlib.suppress(OSError):
            status, body = fetch(url, timeout=min(5, max(0.1, deadline - time.monotonic())))
            if status == 200:
                return body
        time.sleep(interval)
    return None


def proc_status(pid: int | str) -> dict[str, int]:
    """The kB fields of /proc/PID/status (VmRSS, VmHWM, ...); pid may be "self"."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.endswith(" kB\n"):
                out[key] = int(value.split()[0])
    return out


def proc_stat(pid: int) -> dict[str, float]:
    """CPU seconds (utime+stime, all threads), RSS and peak RSS (MB), open fds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)
    status = proc_status(pid)
    return {
        "cpu_s": cpu,
        "rss_mb": status.get("VmRSS", 0) / 1024,
        "hwm_mb": status.get("VmHWM", 0) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def tree(pid: int) -> list[int]:
    """`pid` and every process below it (a supervisor and its workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, ()))
    return found


def tree_stat(pid: int) -> dict[str, float]:
    """proc_stat summed over `tree(pid)` (CPU seconds, RSS, peak RSS, fds), with the pids."""
    total = {"cpu_s": 0.0, "rss_mb": 0.0, "hwm_mb": 0.0, "fds": 0}
    pids = []
    for p in tree(pid):
        with contextlib.suppress(OSError):  # gone between the listing and the read
            for key, value in proc_stat(p).items():
                total[key] += value
            pids.append(p)
    return {**total, "pids": pids}  # type: ignore[dict-item]


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


def loaded(load: float) -> bool:
    """Whether a load average before a run means other work shares the CPUs: the team's rule,
    under 1 on these 2 cores (half a core's worth per core elsewhere)."""
    return load >= 0.5 * (os.cpu_count() or 1)


def load_at_start() -> float:
    """The load average now, with a warning when other work shares the CPUs."""
    load = loadavg()
    if loaded(load):
        log(
            f"WARNING: load average {load:.2f} on {os.cpu_count()} cores: other work "
            "shares the CPUs, the numbers will be low and noisy"
        )
    return load


def load_label(start: float) -> str:
    """The loaded-machine label of a results header: the load average before and now."""
    return f"load average {start:.2f} before / {loadavg():.2f} after"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- tools -------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def ensure_tools(tools: dict[str, str]) -> dict[str, str]:
    """Tool name -> Debian package in; name -> path out. Installs the missing ones with apt-get
    when running as root, else says what to install."""
    missing = {n: pkg for n, pkg in tools.items() if not find_tool(n)}
    if missing:
        pkgs = sorted(set(missing.values()))
        if os.geteuid() != 0 or not find_tool("apt-get"):
            raise BenchError(
                f"missing {', '.join(missing)}: run as root or apt-get install {' '.join(pkgs)}"
            )
        log(f"installing {' '.join(pkgs)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs],
            check=True,
            env=env,
            timeout=900,
        )
    found = {n: find_tool(n) for n in tools}
    if not all(found.values()):
        raise BenchError(f"still missing after apt-get: {[n for n, p in found.items() if not p]}")
    return found  # type: ignore[return-value]


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
    default_type {content_type};
    root {tmp}/www;
{servers}
}}
"""
# One plain HTTP/1.1 server; stub_status counts what it accepted and served.
SERVER = """\
    server {{ listen 127.0.0.1:{port} backlog=4096; location = /nginx_status {{ stub_status; }} }}
"""


class Origin:
    """nginx serving `body` at PAGE from `servers` (an nginx template with one `{name}` per port
    it listens on, and `{tmp}`); the first port's server has the stub_status counters."""

    def __init__(
        self,
        nginx: str,
        tmp: Path,
        body: bytes,
        content_type: str = "application/octet-stream",
        servers: str = SERVER,
        ports: Sequence[str] = ("port",),
    ):
        self.nginx = nginx
        self.tmp = tmp
        self.body = body
        self.content_type = content_type
        self.servers = servers
        self.ports = dict.fromkeys(ports, 0)
        (tmp / "www").mkdir()
        self.page.write_bytes(body)
        self.child: Child | None = None

    @property
    def page(self) -> Path:
        return self.tmp / "www" / PAGE.lstrip("/")

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PAGE}"

    def start(self) -> None:
        conf = self.tmp / "nginx.conf"
        # As root, nginx workers would switch to nobody, who cannot read the 0700 temp dir.
        user = "user root;" if os.geteuid() == 0 else ""
        for _attempt in range(3):
            self.ports = {k: free_port() for k in self.ports}
            servers = self.servers.format(tmp=self.tmp, **self.ports)
            conf.write_text(
                NGINX_CONF.format(
                    tmp=self.tmp, user=user, content_type=self.content_type, servers=servers
                )
            )
            self.child = Child(
                "nginx",
                [self.nginx, "-p", str(self.tmp), "-e", str(self.tmp / "nginx-error.log")]
                + ["-c", str(conf), "-g", "daemon off;"],
                self.tmp / "nginx.out",
            )
            body = wait_http(self.child, self.url, 10)
            if body is not None:
                log(
                    f"origin: nginx pid {self.child.pid}, ports {self.ports}, {len(body)} byte file"
                )
                return
            err = self.child.tail() + "\n" + _tail_of(self.tmp / "nginx-error.log")
            self.child.stop()
            log(f"nginx did not start on ports {self.ports}, retrying:\n{err}")
        raise BenchError("nginx could not start (see above)")

    def _counters(self) -> list[int]:
        """stub_status's accepts, handled, requests; the status request itself counts one."""
        _, body = fetch(f"http://127.0.0.1:{self.port}/nginx_status", timeout=5)
        return [int(x) for x in body.decode().splitlines()[2].split()]

    def served(self) -> int:
        """nginx's total request counter."""
        return self._counters()[2]

    def accepts(self) -> int:
        """The TCP connections nginx accepted (all servers)."""
        return self._counters()[0]

    def wrk_script(self, path: Path, extra: str = "") -> Path:
        """A wrk script sending absolute-form GETs for PAGE (through a proxy), then `extra`."""
        path.write_text(
            WRK_ABSOLUTE.format(url=self.url, host=f"127.0.0.1:{self.port}") + WRK_SUMMARY + extra
        )
        return path

    def stop(self) -> None:
        if self.child:
            self.child.stop()


def _tail_of(p: Path) -> str:
    try:
        return p.read_text(errors="replace")[-3000:]
    except OSError:
        return ""


# --- proxies -----------------------------------------------------------------------------------


def mitmdump_args(confdir: Path, *args: str) -> list[str]:
    """mitmdump listening on 127.0.0.1, with a confdir of its own (not ~/.mitmproxy)."""
    confdir.mkdir(exist_ok=True)
    return [
        str(BIN / "mitmdump"),
        "--listen-host",
        "127.0.0.1",
        *args,
        "--set",
        f"confdir={confdir}",
    ]


def loopback_sets() -> tuple[list[str], dict[str, str]]:
    """--set arguments and environment for the bundle: the loopback origin reachable (the egress
    addon blocks loopback by default) and the management app on loopback, on a free port (the
    prod profile binds 0.0.0.0:9090)."""
    # mitmproxy keeps --set values of options no loaded addon declares, without complaint.
    # The environment too: the profile loader does not count a --set equal to the option's
    # default (metrics_host=127.0.0.1) as set, the environment wins over it.
    mport = str(free_port())
    sets = [
        "--set", "egress_allowed_networks=127.0.0.1/32",
        "--set", "metrics_host=127.0.0.1",
        "--set", f"metrics_port={mport}",
    ]  # fmt: skip
    return sets, {"METRICS_HOST": "127.0.0.1", "METRICS_PORT": mport}


def policies_profile(tmp: Path) -> Path:
    """A profile with every security policy on and the cache off, written into `tmp`: the IP
    ACL (allow and deny lists), rate limiting on every request (limits never reached, so every
    request still takes a token; two rules), the domain filter with a generated 100,000-entry
    list file in the three formats plus inline wildcards, the content-type filter (exact,
    `type/*` and a regex) and the security headers."""
    rng = random.Random(7)
    words = ["ads", "track", "metrics", "pixel", "cdn", "beacon", "stats", "click", "serve", "tag"]
    tlds = ["com", "net", "org", "io", "info", "biz"]
    lines = ["# generated blocklist: 100,000 entries in the three formats people have"]
    for i in range(100_000):
        name = (
            f"{rng.choice(words)}{i}.{rng.choice(words)}-{rng.randrange(10**6)}.{rng.choice(tlds)}"
        )
        lines.append((name, f"0.0.0.0 {name}", f"||{name}^")[i % 3])
    blocklist = tmp / "blocklist.txt"
    blocklist.write_text("\n".join(lines) + "\n")
    profile = tmp / "policies.yaml"
    profile.write_text(POLICIES.format(blocklist=blocklist))
    return profile


POLICIES = """\
server: {{host: 127.0.0.1, port: 8080, timeouts: {{connect: 5s, read: 60s}}}}
logging: {{level: info, format: json, output: stdout}}
metrics: {{enabled: true, host: 127.0.0.1, port: 9090}}
security:
  acl:
    allowed_ips: [127.0.0.0/8, "::1/128", 10.0.0.0/8]
    denied_ips: [127.0.0.99/32, 192.0.2.0/24]
  rate_limiting:
    requests_per_second: 1000000       # never refuses here, but every request takes a token
    burst: 1000000
    max_connections_per_ip: 100000
    rules:
      - {{id: api, path: /api/, requests_per_second: 100}}
      - {{id: ads, host: "*.ads.example", requests_per_second: 1}}
  filtering:
    domains:
      blocked: ["*.doubleclick.net", tracker.example]
      files: ["{blocklist}"]
  content_filtering:
    blocked_types: [video/*, application/x-msdownload, "/^application\\\\/x-(?:bittorrent|rar)/"]
  headers: {{enabled: true, content_security_policy: "default-src 'self'"}}
cache: {{enabled: false}}
"""


@dataclass
class Setup:
    """One mitmdump configuration of a forward-proxy bench."""

    name: str
    scripts: list[str]
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    child: Child | None = None
    port: int = 0
    # what runs instead of mitmdump (e.g. [python, -m, addons.supervisor.worker]), and the port
    # it is told to listen on (0: an ephemeral one, found by a GET through each listener)
    command: list[str] = field(default_factory=list)
    listen_port: int = 0


def start_proxy(setup: Setup, tmp: Path, origin: Origin, timeout: float) -> None:
    """Start `setup` on an ephemeral port; its port is the one a GET of the origin's page works
    through."""
    args = mitmdump_args(
        tmp / f"confdir-{setup.name}", "-p", str(setup.listen_port), "-q", "--set", "flow_detail=0"
    )
    if setup.command:
        args[0:1] = setup.command
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
        ports = sorted({p for pid in tree(child.pid) for _, p in listening_sockets(pid)})
        for port in ports:
            try:
                status, body = fetch(origin.url, proxy_port=port, timeout=5)
            except OSError as e:
                answers[port] = repr(e)
                continue
            if status == 200 and len(body) == len(origin.body):
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


def check_loopback(setup: Setup) -> None:
    assert setup.child is not None
    exposed = [
        f"{a}:{p}"
        for pid in tree(setup.child.pid)
        for a, p in listening_sockets(pid)
        if not is_loopback(a)
    ]
    if exposed:
        raise BenchError(
            f"{setup.name} listens beyond loopback on {exposed}; stopped it "
            "(bind it to 127.0.0.1 with --proxy-args)"
        )


def settle(pid: int, baseline: int, timeout: float = 10) -> None:
    """Wait until the proxy (with its workers) has closed the previous run's connections: its fd
    count is back
    near the count it started with, or has stopped falling for half a second."""
    deadline = time.monotonic() + timeout
    last, stable = -1, 0
    while time.monotonic() < deadline:
        fds = tree_stat(pid)["fds"]
        if fds <= baseline + 4:
            return
        stable = stable + 1 if fds >= last >= 0 else 0
        if stable >= 5:
            return
        last = fds
        time.sleep(0.1)


def stop_all(children: Iterable[Child | None]) -> None:
    for c in children:
        if c:
            c.stop()


# --- wrk ---------------------------------------------------------------------------------------

# Absolute-form requests through the proxy: wrk connects to the proxy, asks for the origin URL.
WRK_ABSOLUTE = """\
wrk.path = "{url}"
wrk.headers["Host"] = "{host}"
"""
WRK_SUMMARY = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WAYPOST_WRK {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.max))
end
"""


def run_wrk(
    wrk: str,
    lua: Path,
    url: str,
    conns: int,
    duration: float,
    threads: int = 1,
    timeout: str | None = None,
    extra: Sequence[str] = (),
) -> dict:
    """One wrk run with a WRK_SUMMARY script: its summary (requests, duration_us, socket error
    counts by kind, status = non-2xx/3xx, latency percentiles in us)."""
    args = [wrk, "-t", str(max(1, min(threads, conns))), "-c", str(conns), "-d", f"{duration:g}s"]
    if timeout:
        args += ["--timeout", timeout]
    args += ["-s", str(lua), *extra, url]
    code, out = run_tool(args, duration + 60)
    for line in out.splitlines():
        if line.startswith("WAYPOST_WRK "):
            return json.loads(line[len("WAYPOST_WRK ") :])
    raise BenchError(f"wrk gave no summary (exit {code}):\n{out}")


def wrk_rps(w: dict) -> float:
    return w["requests"] / (w["duration_us"] / 1e6) if w["duration_us"] else 0.0


# --- results -----------------------------------------------------------------------------------


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
    """One wrk run through `setup` (args: duration, threads, timeout), with the proxy's CPU and
    memory (summed over its workers) and what the origin served meanwhile."""
    assert setup.child is not None
    pid = setup.child.pid
    settle(pid, baseline_fds)
    check_loopback(setup)
    before, served0, drops0 = tree_stat(pid), origin.served(), listen_drops()
    t0 = time.monotonic()
    w = run_wrk(
        wrk,
        lua,
        f"http://127.0.0.1:{setup.port}/",
        conns,
        args.duration,
        args.threads,
        args.timeout,
    )
    wall = time.monotonic() - t0
    if not setup.child.alive():
        raise BenchError(
            f"{setup.name} died during the run at {conns} connections:\n{setup.child.tail()}"
        )
    after, served1, drops1 = tree_stat(pid), origin.served(), listen_drops()
    if set(after["pids"]) != set(before["pids"]):
        log(f"WARNING {setup.name}: its processes changed during the run (a worker restarted?)")
    n = w["requests"]
    cpu = after["cpu_s"] - before["cpu_s"]
    return Row(
        setup=setup.name,
        connections=conns,
        rps=wrk_rps(w),
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


def median_by(rows: Sequence[T], key: Callable[[T], float]) -> T:
    """The row with the median `key` (so every column comes from one real run)."""
    return sorted(rows, key=key)[(len(rows) - 1) // 2]


def median_row(rows: list[Row]) -> Row:
    """The repetition with the median req/s, with every repetition's req/s in `reps`."""
    row = median_by(rows, lambda r: r.rps)
    row.reps = [round(r.rps, 1) for r in rows]
    return row


def ratio(value: float, base: float) -> float | None:
    """value / base (a setup against bare mitmdump); None without a base."""
    return value / base if base else None


def cell(value: float | None, spec: str, suffix: str = "") -> str:
    """A table cell: the formatted value, "-" for None."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def md_row(cells: Iterable[object]) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def table(head: list[str], body: Iterable[Sequence[object]], align: str = "") -> str:
    """A Markdown table. align "": cells as they are; "left": padded to each column's widest
    cell; "right": padded too, every column but the first right-aligned."""
    if not align:
        return "\n".join([md_row(head), "|" + "---|" * len(head), *map(md_row, body)])
    rows = [list(map(str, b)) for b in body]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return md_row(
            c.rjust(w) if align == "right" and i else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), rule, *map(line, rows)])


# --- paced client -------------------------------------------------------------------------


class BadResponse(Exception):
    """A response this client cannot frame or that is not the origin's file."""


@dataclass
class RateResult:
    latencies: list[float]  # seconds to the end of the body, 200s only (see rate_run)
    lags: list[float]  # seconds from due time to actual send, when the connection was idle
    non_200: int
    errors: int  # socket errors and unframeable responses; the connection is reopened
    timeouts: int
    elapsed: float  # clock start to the last answer (at least --duration)


async def read_response(reader: asyncio.StreamReader, size: int) -> tuple[int, bool]:
    """(status, server closes) of one response; its body is read and dropped."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    version, _, rest = head[0].partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise BadResponse(f"status line {head[0]!r}")
    status, length, close = int(rest[:3]), None, False
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            close = "close" in value.lower()
        elif name == "transfer-encoding":
            raise BadResponse(f"Transfer-Encoding: {value.strip()} (only Content-Length is read)")
    if length is None:
        raise BadResponse("no Content-Length")
    await reader.readexactly(length)
    if status == 200 and length != size:
        raise BadResponse(f"200 with {length} body bytes, the origin file has {size}")
    return status, close


RESPONSE_ERRORS = (
    OSError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    ValueError,
    BadResponse,
)


class Conn:
    """One keep-alive client connection to the proxy, reopened after an error."""

    def __init__(self, port: int, size: int):
        self.port = port
        self.size = size
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, req: bytes, timeout: float) -> int:
        # asyncio.timeout, not wait_for: no extra task per request (the client shares the cores)
        async with asyncio.timeout(timeout):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            assert self.reader is not None
            self.writer.write(req)
            status, close = await read_response(self.reader, self.size)
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def rate_run(
    port: int,
    make_request: Callable[[], bytes],
    conns: int,
    rate: float,
    duration: float,
    timeout: float,
    size: int,
    on_start: Callable[[], None],
) -> RateResult:
    """`conns` connections, each sending at Poisson times `rate` per second for `duration`."""
    loop = asyncio.get_running_loop()
    rng = random.Random()
    res = RateResult([], [], 0, 0, 0, 0.0)
    clients = [Conn(port, size) for _ in range(conns)]
    start = end = last_done = 0.0

    async def worker(conn: Conn) -> None:
        nonlocal last_done
        intended = start + rng.expovariate(rate)
        while intended < end:
            now = loop.time()
            if now < intended:
                await asyncio.sleep(intended - now)
                # asyncio wakes up to a few ms late (epoll's ms timeouts, the shared cores):
                # the client's lateness, not the proxy's, so timed from the actual send.
                sent = loop.time()
                res.lags.append(sent - intended)
            else:
                # Still waiting for the previous answer when this one was due: timed from
                # `intended`, as a client on its own schedule would see it. Past the timeout it
                # is counted, not sent, so a backlog drains instead of stretching the run.
                sent = intended
            budget = intended + timeout - loop.time()
            if budget <= 0:
                res.timeouts += 1
            else:
                try:
                    status = await conn.request(make_request(), budget)
                except TimeoutError:
                    res.timeouts += 1
                    conn.close()  # an answer may still come: this connection is out of step
                except RESPONSE_ERRORS as e:
                    res.errors += 1
                    if res.errors <= 3:
                        log(f"request error: {e!r}")
                    conn.close()
                else:
                    done = loop.time()
                    last_done = max(last_done, done)
                    if status == 200:
                        res.latencies.append(done - sent)
                    else:
                        res.non_200 += 1
            intended += rng.expovariate(rate)

    try:
        # Connect and prime every connection (the upstream one too) before the clock runs.
        try:
            primed = await asyncio.gather(*(c.request(make_request(), timeout) for c in clients))
        except RESPONSE_ERRORS as e:  # TimeoutError is an OSError
            raise BenchError(f"priming request through port {port} failed: {e!r}") from e
        if any(status != 200 for status in primed):
            raise BenchError(f"priming requests through port {port} got HTTP {primed}")
        on_start()
        start = loop.time()
        end = last_done = start + duration
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        for c in clients:
            c.close()
    res.elapsed = last_done - start
    return res


def percentile(sorted_xs: list[float], pct: float) -> float:
    """Nearest-rank percentile (0 for no samples)."""
    if not sorted_xs:
        return 0.0
    return sorted_xs[max(0, math.ceil(pct / 100 * len(sorted_xs)) - 1)]
