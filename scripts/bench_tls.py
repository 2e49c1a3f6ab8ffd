"""Reverse-listener benchmarks: HTTP/2 against HTTP/1.1 on the TLS listener, and what the
missing cross-client upstream pool costs. Started as `scripts/bench h2` / `scripts/bench reuse`.

    h2:    h2load (TLS, h2 or --h1) -> mitmdump reverse listener with TLS -> nginx
           (plain HTTP/1.1 origin, and a TLS origin that speaks h2)
    reuse: wrk (plain HTTP) -> mitmdump reverse listener -> nginx, three ways:
           keep-alive clients; keep-alive clients with an origin that closes after every
           response (an upstream connect per request, the client side unchanged); and
           `Connection: close` clients (every request a new client and upstream connection)

Bare mitmdump and the Waypost bundle (prod profile, the listener's certificate from
server.tls's flat options) run side by side in the same run, alternating. Reported per run:
req/s, latency (wrk: p50/p95/p99; h2load: mean and max, all it gives), failed requests, the
proxy's CPU per request, and the upstream connections nginx accepted per request (its
stub_status `accepts` counter), which is what a pool would bring down.

h2load comes from Debian's nghttp2-client, wrk and nginx from Debian too: installed with
apt-get when missing and running as root, else the script says what to install. Everything
listens on 127.0.0.1 and is stopped by PID before exit.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from benchlib import (
    PAGE,
    WRK_SUMMARY,
    BenchError,
    Child,
    Origin,
    cell,
    ensure_tools,
    free_port,
    load_at_start,
    load_label,
    log,
    loopback_sets,
    median_by,
    mitmdump_args,
    proc_stat,
    raise_nofile,
    run,
    run_tool,
    run_wrk,
    settle,
    stop_all,
    table,
    tool_version,
    wait_http,
    wrk_rps,
)

# Three servers: plain HTTP/1.1, the same closing after every response, and TLS with h2.
SERVERS = """\
    server {{ listen 127.0.0.1:{http} backlog=4096; location = /nginx_status {{ stub_status; }} }}
    # The same origin closing every connection after one response (Connection: close).
    server {{ listen 127.0.0.1:{close} backlog=4096; keepalive_timeout 0; }}
    server {{
        listen 127.0.0.1:{https} ssl http2 backlog=4096;
        ssl_certificate {tmp}/origin.pem;
        ssl_certificate_key {tmp}/origin.pem;
    }}
"""


@dataclass
class Proxy:
    name: str
    args: list[str]
    child: Child | None = None
    port: int = 0
    fds: int = 0


def start_proxy(
    name: str, waypost: bool, target: str, tmp: Path, files: dict[str, Path], a: argparse.Namespace
) -> Proxy:
    port = free_port()
    args = mitmdump_args(
        tmp / f"confdir-{name}",
        "-q",
        "--mode", f"reverse:{target}@127.0.0.1:{port}",
        "--set", "flow_detail=0",
        "--set", "connection_strategy=lazy",
        "--set", f"ssl_verify_upstream_trusted_ca={files['ca']}",
    )  # fmt: skip
    env = None
    if waypost:
        sets, extra_env = loopback_sets()
        args += ["-s", "addons/bundle.py", "--set", f"waypost_profile={a.profile}", *sets]
        args += ["--set", f"tls_listener_cert={files['cert']}"]
        args += ["--set", f"tls_listener_key={files['key']}"]
        env = {**os.environ, **extra_env}
    log(f"{name}: {shlex.join(args)}")
    p = Proxy(name, args, Child(name, args, tmp / f"{name}.out", env), port)
    assert p.child is not None
    if wait_http(p.child, f"http://127.0.0.1:{port}{PAGE}", a.start_timeout, 0.2) is None:
        raise BenchError(f"{name} did not start:\n{p.child.tail()}")
    p.fds = proc_stat(p.child.pid)["fds"]
    log(f"{name}: pid {p.child.pid}, reverse listener 127.0.0.1:{port} -> {target}")
    return p


@dataclass
class Row:
    bench: str
    setup: str
    case: str
    rps: float
    lat_ms: str
    requests: int
    failed: int
    cpu_ms_per_req: float | None
    upstream_per_req: float | None
    reps: list[float] = field(default_factory=list)


def h2load(tool: str, port: int, case: str, a: argparse.Namespace) -> dict:
    """One h2load run; case is "h1.1", "h2" (one stream per connection) or "h2 xM"."""
    # The warm-up keeps the TLS handshakes of the connection storm out of the measurement.
    args = [tool, "-c", str(a.connections), "-D", f"{a.duration:g}", "-t", "1", "--warm-up-time=1"]
    if case == "h1.1":
        args += ["--h1", "-m", "1"]
    else:
        args += ["-m", case.partition("x")[2] or "1"]
    _, out = run_tool(args + [f"https://127.0.0.1:{port}{PAGE}"], a.duration + 60)
    m = re.search(
        r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out
    )
    t = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    if not (m and t and lat):
        raise BenchError(f"h2load gave no summary:\n{out}")
    want = "http/1.1" if case == "h1.1" else "h2"
    if not proto or proto.group(1) != want:
        raise BenchError(f"negotiated {proto.group(1) if proto else 'nothing'}, not {want}:\n{out}")
    return {
        "requests": int(m.group(3)),
        "failed": int(m.group(1)) - int(m.group(3)),
        "rps": float(t.group(2)),
        "lat_ms": f"mean {_ms(lat.group(3))}, max {_ms(lat.group(2))}",
    }


def _ms(v: str) -> str:
    n = float(re.sub(r"[a-z]+$", "", v))
    unit = v[len(v.rstrip("usm")) :]
    return f"{n / 1000 if unit == 'us' else n * 1000 if unit == 's' else n:.1f}"


def wrk(tool: str, lua: Path, port: int, close: bool, a: argparse.Namespace) -> dict:
    url = f"http://127.0.0.1:{port}{PAGE}"
    extra = ["-H", "Connection: close"] if close else []
    w = run_wrk(tool, lua, url, a.connections, a.duration, extra=extra)
    return {
        "requests": w["requests"],
        "failed": w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"],
        "rps": wrk_rps(w),
        "lat_ms": f"p50 {w['p50_us'] / 1000:.1f}, p95 {w['p95_us'] / 1000:.1f}, "
        f"p99 {w['p99_us'] / 1000:.1f}",
    }


def measure(p: Proxy, origin: Origin, name: str, case: str, go: Callable[[], dict]) -> Row:
    assert p.child is not None
    settle(p.child.pid, p.fds)
    before, acc0 = proc_stat(p.child.pid), origin.accepts()
    r = go()
    if not p.child.alive():
        raise BenchError(f"{p.name} died:\n{p.child.tail()}")
    after, acc1 = proc_stat(p.child.pid), origin.accepts()
    n = r["requests"]
    cpu = after["cpu_s"] - before["cpu_s"]
    return Row(
        bench=name,
        setup=p.name,
        case=case,
        rps=r["rps"],
        lat_ms=r["lat_ms"],
        requests=n,
        failed=r["failed"],
        cpu_ms_per_req=cpu * 1000 / n if n else None,
        upstream_per_req=(acc1 - acc0 - 1) / n if n else None,  # minus the status request
    )


def median(rows: list[Row]) -> Row:
    row = median_by(rows, lambda r: r.rps)
    row.reps = [round(r.rps) for r in rows]
    return row


def render(rows: list[Row], meta: str) -> str:
    head = [
        "origin",
        "setup",
        "client",
        "req/s",
        "latency ms",
        "failed",
        "CPU ms/req",
        "upstream conn/req",
        "runs",
    ]
    body = [
        [
            r.bench,
            r.setup,
            r.case,
            f"{r.rps:.0f}",
            r.lat_ms,
            str(r.failed),
            cell(r.cpu_ms_per_req, ".2f"),
            cell(r.upstream_per_req, ".2f"),
            "/".join(map(str, r.reps)),
        ]
        for r in rows
    ]
    return "\n".join([meta, "", table(head, body, align="left")])


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench h2|reuse", description=__doc__.split("\n\n")[0])
    p.add_argument("which", choices=["h2", "reuse"])
    p.add_argument("--duration", type=float, default=5, help="seconds per run (default 5)")
    p.add_argument("--connections", type=int, default=50, help="client connections (default 50)")
    p.add_argument(
        "--streams",
        type=int,
        default=10,
        help="h2 streams per connection in the multiplexed case (default 10)",
    )
    p.add_argument(
        "--repeat", type=int, default=3, help="repetitions; the median is shown (default 3)"
    )
    p.add_argument("--size", type=int, default=1024, help="response size in bytes (default 1024)")
    p.add_argument("--profile", default="profiles/prod.yaml", help="the bundle's profile")
    p.add_argument("--no-bare", action="store_true", help="bench the bundle only")
    p.add_argument("--start-timeout", type=float, default=60)
    a = p.parse_args(argv)
    if a.duration <= 0 or a.connections < 1 or a.repeat < 1 or a.streams < 1:
        p.error("--duration, --connections, --repeat and --streams must be positive")
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    tools = ensure_tools({"nginx": "nginx", "wrk": "wrk", "h2load": "nghttp2-client"})
    raise_nofile()
    import mitmproxy.version

    load0 = load_at_start()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="waypost-bench-tls-") as tmpdir:
        tmp = Path(tmpdir)
        ca = trustme.CA()
        files = {"cert": tmp / "cert.pem", "key": tmp / "key.pem", "ca": tmp / "ca.pem"}
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        leaf.cert_chain_pems[0].write_to_path(str(files["cert"]))
        leaf.private_key_pem.write_to_path(str(files["key"]))
        ca.cert_pem.write_to_path(str(files["ca"]))
        ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
            str(tmp / "origin.pem")
        )
        origin = Origin(
            tools["nginx"],
            tmp,
            os.urandom(a.size),
            servers=SERVERS,
            ports=("http", "close", "https"),
        )
        proxies: list[Proxy] = []
        try:
            origin.start()
            if a.which == "h2":
                targets = {
                    "http/1.1 origin": f"http://127.0.0.1:{origin.ports['http']}",
                    "h2 TLS origin": f"https://127.0.0.1:{origin.ports['https']}",
                }
                cases = ["h1.1", "h2", f"h2 x{a.streams}"]
            else:
                targets = {
                    "keep-alive origin": f"http://127.0.0.1:{origin.ports['http']}",
                    "closing origin": f"http://127.0.0.1:{origin.ports['close']}",
                }
                cases = ["keep-alive", "Connection: close"]
            lua = tmp / "summary.lua"
            lua.write_text(WRK_SUMMARY)
            for label, target in targets.items():
                setups = [] if a.no_bare else [("bare", False)]
                setups.append(("waypost", True))
                group = []
                for name, waypost in setups:
                    slug = f"{name}-{len(proxies)}"
                    proxy = start_proxy(slug, waypost, target, tmp, files, a)
                    proxy.name = name
                    proxies.append(proxy)
                    group.append(proxy)
                for case in cases:
                    if a.which == "reuse" and label == "closing origin" and case != "keep-alive":
                        continue  # the client side is what varies in the other row
                    per: dict[str, list[Row]] = {p.name: [] for p in group}
                    for _ in range(a.repeat):
                        for p in group:
                            if a.which == "h2":
                                go = lambda p=p, c=case: h2load(tools["h2load"], p.port, c, a)  # noqa: E731
                            else:
                                close = case != "keep-alive"
                                go = lambda p=p, c=close: wrk(tools["wrk"], lua, p.port, c, a)  # noqa: E731
                            r = measure(p, origin, label, case, go)
                            log(f"{label:18} {p.name:8} {case:18} {r.rps:7.0f} req/s  {r.lat_ms}")
                            per[p.name].append(r)
                    rows += [median(per[p.name]) for p in group]
                stop_all(p.child for p in group)
        finally:
            stop_all([*(p.child for p in proxies), origin.child])
    meta = (
        f"scripts/bench {a.which}: nproc {os.cpu_count()}, Python {sys.version.split()[0]}, "
        f"mitmproxy {mitmproxy.version.VERSION}, {tool_version([tools['h2load'], '--version'])}, "
        f"{a.connections} connections, {a.duration:g}s runs, median of {a.repeat}, "
        f"{a.size} byte responses, {load_label(load0)}"
    )
    print(render(rows, meta))
    return 0


if __name__ == "__main__":
    run(main)
