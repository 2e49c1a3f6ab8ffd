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
import json
import os
import platform
import shlex
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from benchlib import (
    ROOT,
    BenchError,
    Origin,
    Row,
    Setup,
    cell,
    ensure_tools,
    load_at_start,
    loadavg,
    log,
    loopback_sets,
    measure,
    median_row,
    proc_stat,
    raise_nofile,
    ratio,
    run,
    run_wrk,
    start_proxy,
    stop_all,
    table,
    tool_version,
)


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
                cell(r.cpu_ms_per_req, ".2f"),
                f"{r.cpu_pct:.0f}",
                cell(r.ratio, ".2f", "x"),
            ]
        )
    out = [
        f"nproc {meta['nproc']}, {meta['python']}, mitmproxy {meta['mitmproxy']}, "
        f"{meta['wrk']}, {meta['nginx']}",
        f"{meta['duration']:g}s per run, wrk threads {meta['threads']}, "
        f"{meta['size']} byte responses, keep-alive, "
        f"repetitions {meta['repeat']}, PYTHONOPTIMIZE={meta['pythonoptimize'] or '-'}, "
        f"load average {meta['load_start']:.2f} before / {meta['load_end']:.2f} after",
        "",
        table(head, body, align="right"),
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
        "--baseline",
        metavar="DIR",
        help="also bench the bundle of another checkout (e.g. a git worktree of the previous "
        "release) as setup 'baseline', interleaved with the others in the same run",
    )
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
    if a.baseline and (a.no_waypost or a.scripts):
        p.error("--baseline compares bundles: not with --no-waypost or --scripts")
    if a.no_bare and a.no_waypost:
        p.error("nothing to bench: --no-bare and --no-waypost")
    return a


def build_setups(a: argparse.Namespace) -> list[Setup]:
    setups = []
    if not a.no_bare:
        setups.append(Setup("bare", [], shlex.split(a.bare_args)))
    if a.no_waypost:
        return setups
    if a.scripts:
        files = [s.strip() for s in a.scripts.split(",") if s.strip()]
        for f in files:
            if not (ROOT / f).is_file():
                raise BenchError(f"--scripts: {f} does not exist")
        sets, env = loopback_sets()
        setups.append(Setup("waypost", files, pipeline_args(a, sets), env))
        return setups
    setups.append(bundle_setup("waypost", ROOT, a))
    if a.baseline:
        setups.append(bundle_setup("baseline", Path(a.baseline).resolve(), a))
    return setups


def pipeline_args(a: argparse.Namespace, sets: list[str]) -> list[str]:
    # The cache is off: nginx's static file would be a hit after the first request, and this
    # measures the pipeline on proxied requests (scripts/bench-cache measures the cache).
    return ["--set", "cache_enabled=false", *sets, *shlex.split(a.proxy_args)]


def bundle_setup(name: str, tree: Path, a: argparse.Namespace) -> Setup:
    """The bundle of the checkout `tree` with the profile `a.profile` of that checkout; another
    checkout's `addons` package comes first on PYTHONPATH, so the venv's editable install of
    this one is not what runs."""
    bundle, profile = tree / "addons/bundle.py", tree / a.profile
    if not bundle.is_file():
        raise BenchError(f"{bundle} does not exist (pass --scripts or --no-waypost)")
    if not profile.is_file():
        raise BenchError(f"profile {profile} does not exist (--profile)")
    sets, env = loopback_sets()
    if tree != ROOT:
        env["PYTHONPATH"] = str(tree)
    args = ["--set", f"waypost_profile={profile}", *pipeline_args(a, sets)]
    return Setup(name, [str(bundle)], args, env)


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    setups = build_setups(a)
    tools = ensure_tools({"wrk": "wrk", "nginx": "nginx"})
    wrk, nginx = tools["wrk"], tools["nginx"]
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
        "load_start": load_at_start(),
        "load_end": 0.0,
        "setups": {},
    }
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="waypost-bench-") as tmpdir:
        tmp = Path(tmpdir)
        origin = Origin(nginx, tmp, os.urandom(a.size))
        try:
            origin.start()
            lua = origin.wrk_script(tmp / "absolute.lua")
            baselines = {}
            for s in setups:
                start_proxy(s, tmp, origin, a.start_timeout)
                assert s.child is not None
                meta["setups"][s.name] = shlex.join(s.child.args[1:])
                baselines[s.name] = proc_stat(s.child.pid)["fds"]
            if a.warmup > 0:
                for s in setups:
                    log(f"warm-up {s.name}: {a.warmup:g}s at 100 connections")
                    url = f"http://127.0.0.1:{s.port}/"
                    run_wrk(wrk, lua, url, 100, a.warmup, a.threads, a.timeout)
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
                    if bare and r is not bare:
                        r.ratio = ratio(r.rps, bare.rps)
                rows.extend(chosen)
            for s in setups:
                assert s.child is not None
                meta["setups"][s.name] += f"  [peak RSS {proc_stat(s.child.pid)['hwm_mb']:.0f} MB]"
        finally:
            stop_all([*(s.child for s in setups), origin.child])
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
    run(main)
