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
Docker image runs. `--policies` benches a generated profile with every security policy on and
a 100,000-entry blocklist (scripts/bench-policies). This mode runs the bundle under plain
mitmdump: asyncio, with the runtime addon's collector tuning (the bundle loads it).

`scripts/bench workers` is the scale-out table: bare mitmdump, Waypost with 1 worker and with N
workers (`python -m addons.supervisor --set server_workers=N`, the way Waypost starts: its
event loop, the GC tuning), every policy on, the cache off, in one run: wrk at 10/100/1000 connections, a
paced open-loop run at 1,000 req/s (the asyncio client of benchlib: wrk cannot pace, and
h2load's --rate paces new connections, not requests), and 4,000 connections counting socket
errors; CPU per request summed over every process of a setup; ratios against bare mitmdump
and N workers against 1; the targets printed next to the results; `--variants` adds 1 worker
on uvloop and 1 worker with CPython's collector settings. `scripts/bench workers --help`.
Only the standard library is used here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from benchlib import (
    ROOT,
    BenchError,
    Origin,
    Row,
    Setup,
    cell,
    check_loopback,
    ensure_tools,
    free_port,
    load_at_start,
    loadavg,
    loaded,
    log,
    loopback_sets,
    measure,
    median_row,
    percentile,
    policies_profile,
    raise_nofile,
    rate_run,
    ratio,
    run,
    run_wrk,
    settle,
    start_proxy,
    stop_all,
    table,
    tool_version,
    tree,
    tree_stat,
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
        "--policies",
        action="store_true",
        help="every security policy on, a 100,000-entry blocklist, the cache off "
        "(a generated profile instead of --profile; scripts/bench-policies)",
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
    if a.policies and a.scripts:
        p.error("--policies is a profile: not with --scripts")
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
    if argv[:1] == ["workers"]:
        return workers_main(argv[1:])
    a = parse_args(argv)
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
        if a.policies:
            a.profile = str(policies_profile(tmp))
        setups = build_setups(a)
        origin = Origin(nginx, tmp, os.urandom(a.size))
        try:
            origin.start()
            lua = origin.wrk_script(tmp / "absolute.lua")
            baselines = {}
            for s in setups:
                start_proxy(s, tmp, origin, a.start_timeout)
                assert s.child is not None
                meta["setups"][s.name] = shlex.join(s.child.args[1:])
                baselines[s.name] = tree_stat(s.child.pid)["fds"]
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
                meta["setups"][s.name] += f"  [peak RSS {tree_stat(s.child.pid)['hwm_mb']:.0f} MB]"
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


# --- scripts/bench workers: one process against an instance of N workers ---------------------

SCALE_TARGET = 1.8  # N workers' req/s over 1 worker's
PACED_P95_MS = 50.0
SERVED = 0.95  # served req/s over offered that counts as "in full" (Poisson: a few % either way)


@dataclass
class PacedRow:
    setup: str
    offered: float
    connections: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    failed: int  # non-200 answers, socket errors and timeouts
    lag_p99_ms: float  # how late the client itself sent (its own share of the cores)
    cpu_ms_per_req: float | None
    processes: int


def workers_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench workers",
        description="Bare mitmdump (1 process), Waypost with 1 worker and Waypost with N workers "
        "(python -m addons.supervisor --set server_workers=N), every security policy on, a "
        "100,000-entry blocklist, the cache off, in one run: wrk at each connection count, a "
        "paced (open-loop) run at --rate req/s, and a --storm connection run counting socket "
        "errors, with the scale-out targets printed next to the results. CPU time is summed "
        "over every process of a setup (the supervisor and its workers).",
    )
    p.add_argument("--duration", type=float, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--warmup", type=float, default=3, help="warm-up seconds per setup (default 3)")
    p.add_argument("--connections", default="10,100,1000", help="wrk connection counts")
    p.add_argument("--repeat", type=int, default=1, help="wrk runs per cell, median (default 1)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--timeout", default="10s", help="per-request timeout (default 10s)")
    p.add_argument("--workers", type=int, default=2, help="N of the N-worker setup (default 2)")
    p.add_argument(
        "--rate",
        type=float,
        default=1000,
        help="paced run: requests per second offered in all (default 1000; 0 skips it); "
        "Poisson arrivals over --rate-connections keep-alive connections, from the asyncio "
        "client in this process (wrk cannot pace; h2load --rate paces new connections, not "
        "requests)",
    )
    p.add_argument("--rate-connections", type=int, default=50, help="default 50")
    p.add_argument("--rate-duration", type=float, help="seconds (default --duration)")
    p.add_argument(
        "--storm",
        type=int,
        default=4000,
        help="connections of the socket-error run (default 4000; 0 skips it)",
    )
    p.add_argument("--storm-duration", type=float, default=20, help="seconds (default 20)")
    p.add_argument("--size", type=int, default=1024, help="origin body bytes (default 1024)")
    p.add_argument(
        "--profile",
        help="profile of the Waypost setups (default: the generated every-policy profile)",
    )
    p.add_argument(
        "--variants",
        action="store_true",
        help="also 1 worker on uvloop (server_event_loop=uvloop) and 1 worker with CPython's "
        "collector (no gc.freeze, thresholds 700,10,10): what uvloop and the GC tuning change",
    )
    p.add_argument("--start-timeout", type=float, default=60)
    p.add_argument("--json", action="store_true", help="results as JSON on stdout")
    a = p.parse_args(argv)
    try:
        a.conn_list = [int(c) for c in a.connections.split(",") if c.strip()]
        a.timeout_s = float(a.timeout.rstrip("s"))
    except ValueError:
        p.error("--connections: comma-separated integers; --timeout: seconds, e.g. 10s")
    if a.workers < 2 or a.rate < 0 or a.rate_connections < 1 or a.repeat < 1:
        p.error("--workers must be 2 or more, --rate 0 or more, --rate-connections and --repeat 1+")
    a.rate_duration = a.rate_duration or a.duration
    return a


def instance_setups(a: argparse.Namespace, profile: Path) -> list[Setup]:
    """bare mitmdump, 1 worker, N workers; the last only once the supervisor exists."""
    supervised = (ROOT / "addons/supervisor/__main__.py").is_file()
    bundle = [str(ROOT / "addons/bundle.py")]

    def waypost(
        name: str, module: str, workers: int | None, port: int = 0, extra: tuple[str, ...] = ()
    ) -> Setup:
        sets, env = loopback_sets()
        args = ["--set", f"waypost_profile={profile}", "--set", "cache_enabled=false", *sets]
        args += extra
        if workers is not None:
            args += ["--set", f"server_workers={workers}"]
        cmd = [sys.executable, "-m", module]
        return Setup(name, bundle, args, env, command=cmd, listen_port=port)

    # One worker is the worker itself (the supervisor execs it); until the supervisor is on
    # this branch, the worker module started directly.
    if supervised:
        setups = [waypost("1 worker", "addons.supervisor", 1)]
        # Every worker binds the same port (SO_REUSEPORT), so it has to be a fixed one.
        n = a.workers
        setups.append(waypost(f"{n} workers", "addons.supervisor", n, free_port()))
    else:
        log("addons/supervisor/__main__.py is not here: 1 worker through the worker module only")
        setups = [waypost("1 worker", "addons.supervisor.worker", None)]
    if a.variants:
        module = "addons.supervisor" if supervised else "addons.supervisor.worker"
        workers = 1 if supervised else None
        loop = ("--set", "server_event_loop=uvloop")
        cpython_gc = ("--set", "server_gc_freeze=false", "--set", "server_gc_threshold=700,10,10")
        setups.append(waypost("1w uvloop", module, workers, extra=loop))
        setups.append(waypost("1w CPython GC", module, workers, extra=cpython_gc))
    return [Setup("bare", [], []), *setups]


def paced(s: Setup, origin: Origin, a: argparse.Namespace, baseline_fds: int) -> PacedRow:
    """`a.rate` req/s offered through `s` for `a.rate_duration` seconds, open loop."""
    assert s.child is not None
    settle(s.child.pid, baseline_fds)
    check_loopback(s)
    before: dict[str, object] = {}
    req = f"GET {origin.url} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()

    def on_start() -> None:
        before.update(tree_stat(s.child.pid))  # type: ignore[union-attr]

    res = asyncio.run(
        rate_run(
            s.port,
            lambda: req,
            a.rate_connections,
            a.rate / a.rate_connections,
            a.rate_duration,
            a.timeout_s,
            a.size,
            on_start,
        )
    )
    after = tree_stat(s.child.pid)
    lat = sorted(res.latencies)
    n = len(lat)
    cpu = after["cpu_s"] - before["cpu_s"]  # type: ignore[operator]
    return PacedRow(
        setup=s.name,
        offered=a.rate,
        connections=a.rate_connections,
        rps=n / res.elapsed if res.elapsed else 0.0,
        p50_ms=percentile(lat, 50) * 1000,
        p95_ms=percentile(lat, 95) * 1000,
        p99_ms=percentile(lat, 99) * 1000,
        max_ms=(lat[-1] if lat else 0.0) * 1000,
        failed=res.non_200 + res.errors + res.timeouts,
        lag_p99_ms=percentile(sorted(res.lags), 99) * 1000,
        cpu_ms_per_req=cpu * 1000 / n if n else None,
        processes=len(after["pids"]),  # type: ignore[arg-type]
    )


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def render_workers(
    rows: list[Row],
    scale: dict[int, float | None],
    pace: list[PacedRow],
    storm: list[Row],
    meta: dict,
) -> str:
    out = [
        f"# scripts/bench workers: {meta['label']}",
        f"nproc {meta['nproc']}, {meta['python']}, mitmproxy {meta['mitmproxy']}, {meta['wrk']}, "
        f"{meta['nginx']}, PYTHONOPTIMIZE={meta['pythonoptimize'] or '-'}",
        f"load average {meta['load_start']:.2f} at the start, {meta['load_end']:.2f} at the end; "
        f"every security policy on, 100,000-entry blocklist, cache off, {meta['size']} B body",
        "",
        f"## wrk, closed loop, {meta['duration']:g}s runs, median of {meta['repeat']}",
        "",
    ]
    head = ["setup", "conns", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "non-2xx"]
    head += ["CPU ms/req", "RSS MB", "vs bare", "vs 1 worker"]
    one = {r.connections: r.rps for r in rows if r.setup == "1 worker"}
    body = [
        [
            r.setup,
            r.connections,
            f"{r.rps:.0f}",
            f"{r.p50_ms:.1f}",
            f"{r.p95_ms:.1f}",
            f"{r.p99_ms:.1f}",
            r.socket_errors + r.timeouts,
            r.non_2xx,
            cell(r.cpu_ms_per_req, ".2f"),
            f"{r.rss_mb:.0f}",
            cell(r.ratio, ".2f", "x"),
            "-"
            if r.setup in ("bare", "1 worker")
            else cell(ratio(r.rps, one.get(r.connections, 0)), ".2f", "x"),
        ]
        for r in rows
    ]
    out += [table(head, body, align="right"), ""]
    if pace:
        out += [
            f"## paced: {meta['rate']:g} req/s offered, Poisson, open loop, "
            f"{meta['rate_connections']} connections, {meta['rate_duration']:g}s",
            "",
        ]
        head = ["setup", "offered", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "failed"]
        head += ["send lag p99 ms", "CPU ms/req", "processes"]
        body = [
            [
                r.setup,
                f"{r.offered:g}",
                f"{r.rps:.0f}",
                f"{r.p50_ms:.1f}",
                f"{r.p95_ms:.1f}",
                f"{r.p99_ms:.1f}",
                f"{r.max_ms:.0f}",
                r.failed,
                f"{r.lag_p99_ms:.1f}",
                cell(r.cpu_ms_per_req, ".2f"),
                r.processes,
            ]
            for r in pace
        ]
        out += [table(head, body, align="right"), ""]
    if storm:
        out += [f"## {meta['storm']} connections, wrk, {meta['storm_duration']:g}s", ""]
        head = ["setup", "req/s", "p99 ms", "socket errors", "timeouts", "SYN drops", "non-2xx"]
        body = [
            [
                r.setup,
                f"{r.rps:.0f}",
                f"{r.p99_ms:.0f}",
                r.socket_errors,
                r.timeouts,
                r.listen_drops,
                r.non_2xx,
            ]
            for r in storm
        ]
        out += [table(head, body, align="right"), ""]
    out.append("## targets (scale-out)")
    n = meta["workers"]
    if scale:
        cells = ", ".join(
            f"c={c}: {cell(v, '.2f', 'x')} {verdict(v is not None and v >= SCALE_TARGET)}"
            for c, v in scale.items()
        )
        out.append(f"- {n} workers >= {SCALE_TARGET}x the req/s of 1 worker: {cells}")
    else:
        out.append(f"- {n} workers >= {SCALE_TARGET}x 1 worker: not measured (no supervisor)")
    for r in pace:
        if r.setup == "bare":
            continue
        # In full: nothing failed, and the answers kept up (req/s runs to the last answer).
        ok = r.failed == 0 and r.rps >= SERVED * r.offered and r.p95_ms < PACED_P95_MS
        out.append(
            f"- paced {r.offered:g} req/s served in full at p95 < {PACED_P95_MS:g} ms, "
            f"{r.setup}: {r.rps:.0f} req/s, {r.failed} failed, p95 {r.p95_ms:.1f} ms {verdict(ok)}"
        )
    for r in storm:
        if r.setup == "bare":
            continue
        errors = r.socket_errors + r.timeouts
        result = verdict(errors == 0) if r.requests else "no request completed: lengthen it"
        out.append(
            f"- 0 socket errors at {r.connections} connections, {r.setup}: {errors} {result}"
        )
    out += [
        "",
        "errors: wrk's connect+read+write errors and timeouts; failed (paced): non-200 answers,",
        "socket errors and requests not answered within --timeout of when they were due; paced",
        f"req/s: 200s over the run and its drain (served in full: >= {SERVED:.0%} of offered); CPU",
        "ms/req and RSS: summed over every process of the setup; SYN drops: machine-wide",
        "TcpExt ListenDrops during the run. The load generators share the cores with the proxies.",
    ]
    out += [f"{name}: {cmd}" for name, cmd in meta["setups"].items()]
    return "\n".join(out)


def workers_main(argv: list[str]) -> int:
    a = workers_args(argv)
    tools = ensure_tools({"wrk": "wrk", "nginx": "nginx"})
    wrk, nginx = tools["wrk"], tools["nginx"]
    nofile = raise_nofile()  # before the proxies start: they inherit it
    if max([*a.conn_list, a.storm]) + 200 > nofile:
        log(f"WARNING: open-files limit {nofile} is below the connections asked for")
    import mitmproxy.version

    load = load_at_start()
    meta = {
        "label": "LOADED machine, not figures of record" if loaded(load) else "quiet machine",
        "nproc": os.cpu_count(),
        "python": f"Python {platform.python_version()}",
        "mitmproxy": mitmproxy.version.VERSION,
        "wrk": tool_version([wrk, "-v"]).split(" Copyright")[0],
        "nginx": tool_version([nginx, "-v"]).replace("nginx version: ", ""),
        "pythonoptimize": os.environ.get("PYTHONOPTIMIZE", ""),
        "load_start": load,
        "load_end": 0.0,
        "duration": a.duration,
        "repeat": a.repeat,
        "size": a.size,
        "workers": a.workers,
        "rate": a.rate,
        "rate_connections": a.rate_connections,
        "rate_duration": a.rate_duration,
        "storm": a.storm,
        "storm_duration": a.storm_duration,
        "setups": {},
    }
    rows: list[Row] = []
    scale: dict[int, float | None] = {}
    pace: list[PacedRow] = []
    storm: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="waypost-bench-workers-") as tmpdir:
        tmp = Path(tmpdir)
        profile = Path(a.profile).resolve() if a.profile else policies_profile(tmp)
        setups = instance_setups(a, profile)
        origin = Origin(nginx, tmp, os.urandom(a.size))
        try:
            origin.start()
            lua = origin.wrk_script(tmp / "absolute.lua")
            fds = {}
            for s in setups:
                start_proxy(s, tmp, origin, a.start_timeout)
                assert s.child is not None
                meta["setups"][s.name] = shlex.join(s.child.args)
                fds[s.name] = tree_stat(s.child.pid)["fds"]
                log(f"{s.name}: processes {tree(s.child.pid)}")
            for s in setups:
                if a.warmup > 0:
                    url = f"http://127.0.0.1:{s.port}/"
                    run_wrk(wrk, lua, url, 100, a.warmup, a.threads, a.timeout)
            names = [s.name for s in setups]
            one, many = "1 worker", f"{a.workers} workers"
            if many not in names:
                one = many = ""
            for conns in a.conn_list:
                per: dict[str, list[Row]] = {s.name: [] for s in setups}
                for _rep in range(a.repeat):
                    for s in setups:
                        r = measure(s, origin, wrk, lua, conns, a, fds[s.name])
                        log(f"{s.name:10} c={conns:<5} {r.rps:7.0f} req/s  p95 {r.p95_ms:7.1f} ms")
                        per[s.name].append(r)
                chosen = {name: median_row(rs) for name, rs in per.items()}
                for r in chosen.values():
                    if r.setup != "bare":
                        r.ratio = ratio(r.rps, chosen["bare"].rps)
                if one and many:
                    scale[conns] = ratio(chosen[many].rps, chosen[one].rps)
                rows.extend(chosen.values())
            if a.rate > 0:
                for s in setups:
                    r = paced(s, origin, a, fds[s.name])
                    log(
                        f"{s.name:10} paced {r.rps:6.0f} req/s  p95 {r.p95_ms:7.1f} ms  failed {r.failed}"
                    )
                    pace.append(r)
            if a.storm > 0:
                storm_args = argparse.Namespace(
                    duration=a.storm_duration, threads=a.threads, timeout=a.timeout
                )
                for s in setups:
                    r = measure(s, origin, wrk, lua, a.storm, storm_args, fds[s.name])
                    log(f"{s.name:10} c={a.storm} errors {r.socket_errors}+{r.timeouts}t")
                    storm.append(r)
        finally:
            stop_all([*(s.child for s in setups), origin.child])
    meta["load_end"] = loadavg()
    text = render_workers(rows, scale, pace, storm, meta)
    if a.json:
        print(text, file=sys.stderr)
        result = {
            "meta": meta,
            "rows": [asdict(r) for r in rows],
            "scale": scale,
            "paced": [asdict(r) for r in pace],
            "storm": [asdict(r) for r in storm],
        }
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(text)
    return 0


if __name__ == "__main__":
    run(main)
