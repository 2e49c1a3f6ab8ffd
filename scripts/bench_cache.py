"""Cache benchmark: hits and misses of `addons/cache.py` against bare mitmdump.

Usually started through `scripts/bench-cache`. The nginx origin, wrk runner and process
handling are scripts/benchlib.py's (everything on 127.0.0.1, stopped by PID before exit).

    client (absolute-form GETs, keep-alive) -> mitmdump (-p 0) -> nginx (1 KB static file)

Four setups per connection count, interleaved per repetition so drift on a shared machine
hits them alike:
- bare, one URL          bare mitmdump, every request for the same URL
- cache, one URL         mitmdump -s addons/leanchain.py -s addons/cache.py -s
                         addons/runtime.py, the cache with the lean event chain and the
                         collector tuning the bundle always loads (--alone: cache.py only;
                         --cpython-gc: CPython's collector settings, no gc.freeze):
                         after the first request every one is a HIT
- bare, unique URLs      bare mitmdump, every request for a new URL (`?n=<random>`)
- cache, unique URLs     every request a MISS that is fetched, stored and later evicted
The origin file's mtime is set 30 days back, so nginx's Last-Modified makes it heuristically
fresh (RFC 9111 §4.2.2) and `cache_default_ttl=1h` caps that at an hour.

Two modes:
- default, throughput: wrk, closed loop (default --connections 10,100). Every connection
  sends its next request as soon as the last one is answered, so the proxy is saturated and
  wrk's latencies are mostly queueing: they compare throughput, not the cost of one request.
  The repetition with the median req/s is kept.
- --rate R, latency: R requests per second on each connection (default --connections 10),
  open loop, from an asyncio client in this process. Arrivals are Poisson per connection
  (exponential gaps, so a random first send too): connections do not fire in lock-step and
  bursts happen as they would from independent clients. A request due while its connection
  still waits for the previous answer is timed from when it was due, so it counts that wait
  (no coordinated omission); one on an idle connection from when it was sent (asyncio's
  timers wake up to a few ms late: the client's lateness, logged as send lag). No answer
  within --timeout of the due time is a timeout.
  Each connection is opened and sends one unmeasured request before the clock starts, so
  client and upstream connects are not in the numbers. The repetition with the median p95 is
  kept. Offered load should stay well below what the proxy serves (wrk mode shows that), or
  this measures queueing again.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import benchlib

sys.path.insert(0, str(benchlib.ROOT))
from addons.kernel.units import parse_duration  # noqa: E402

MISS_LUA_REQUEST = """
math.randomseed(os.time() + tonumber(tostring({{}}):sub(8), 16))
request = function()
  return wrk.format("GET", "{url}?n=" .. math.random(1, 2000000000) .. "-" .. math.random(1, 2000000000))
end
"""

# (row name, setup, every request for a new URL)
RUNS = (
    ("bare, one URL", "bare", False),
    ("cache, one URL (HIT)", "cache", False),
    ("bare, unique URLs", "bare", True),
    ("cache, unique URLs (MISS)", "cache", True),
)
BASES = {"cache, one URL (HIT)": "bare, one URL", "cache, unique URLs (MISS)": "bare, unique URLs"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--repeat", type=int, default=3, help="runs per setup, median kept (default 3)")
    p.add_argument(
        "--connections",
        help="comma-separated (default 10,100; with --rate 10)",
    )
    p.add_argument(
        "--rate",
        type=float,
        help="latency mode: requests per second on EACH connection, Poisson arrivals,\n"
        "open loop (see above); without it wrk measures throughput",
    )
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per setup (wrk)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument(
        "--timeout",
        default="10s",
        help="per-request timeout (default 10s); with --rate counted from the due time",
    )
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument("--size", type=int, default=1024, help="origin body bytes (default 1024)")
    p.add_argument(
        "--alone",
        action="store_true",
        help="load addons/cache.py alone, without the bundle's addons/leanchain.py and\n"
        "addons/runtime.py",
    )
    p.add_argument(
        "--cpython-gc",
        action="store_true",
        help="the runtime addon with CPython's collector settings (thresholds 700,10,10,\n"
        "no gc.freeze): what the collector tuning changes for misses",
    )
    a = p.parse_args(argv)
    default = "10" if a.rate else "10,100"
    a.conn_list = [int(c) for c in (a.connections or default).split(",") if c.strip()]
    if a.rate is not None and a.rate <= 0:
        p.error("--rate must be positive")
    if a.cpython_gc and a.alone:
        p.error("--cpython-gc sets the runtime addon's options: not with --alone")
    # wrk's syntax, so one --timeout serves both modes
    try:
        a.timeout_s = parse_duration(a.timeout)
    except ValueError as e:
        p.error(f"--timeout: {e}")
    return a


@dataclass
class RateRow:
    setup: str
    connections: int
    offered: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    lag_p99_ms: float
    non_200: int
    errors: int
    timeouts: int
    origin_served: int
    cpu_ms_per_req: float | None
    ratio: float | None = None


def measure_rate(
    setup: benchlib.Setup,
    name: str,
    origin: benchlib.Origin,
    make_request: Callable[[], bytes],
    conns: int,
    a: argparse.Namespace,
    baseline_fds: int,
) -> RateRow:
    assert setup.child is not None
    pid = setup.child.pid
    benchlib.settle(pid, baseline_fds)
    benchlib.check_loopback(setup)
    before: dict[str, float] = {}

    def on_start() -> None:
        before.update(benchlib.proc_stat(pid), served=origin.served())

    res = asyncio.run(
        benchlib.rate_run(
            setup.port,
            make_request,
            conns,
            a.rate,
            a.duration,
            a.timeout_s,
            a.size,
            on_start,
        )
    )
    if not setup.child.alive():
        raise benchlib.BenchError(f"{setup.name} died during the run:\n{setup.child.tail()}")
    after, served = benchlib.proc_stat(pid), origin.served()
    lat, lags = sorted(res.latencies), sorted(res.lags)
    n = len(lat)
    cpu = after["cpu_s"] - before["cpu_s"]
    return RateRow(
        setup=name,
        connections=conns,
        offered=conns * a.rate,
        rps=n / res.elapsed,
        p50_ms=benchlib.percentile(lat, 50) * 1000,
        p95_ms=benchlib.percentile(lat, 95) * 1000,
        p99_ms=benchlib.percentile(lat, 99) * 1000,
        max_ms=(lat[-1] if lat else 0.0) * 1000,
        lag_p99_ms=benchlib.percentile(lags, 99) * 1000,
        non_200=res.non_200,
        errors=res.errors,
        timeouts=res.timeouts,
        origin_served=int(served - before["served"]) - 1,  # minus the first status request
        cpu_ms_per_req=cpu * 1000 / n if n else None,
    )


def rate_rows(
    a: argparse.Namespace,
    setups: dict[str, benchlib.Setup],
    origin: benchlib.Origin,
    baselines: dict[str, int],
) -> list[RateRow]:
    host = f"127.0.0.1:{origin.port}"

    def request(url: str) -> bytes:
        return f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    one = request(origin.url)

    def unique() -> Callable[[], bytes]:
        # A fresh prefix per run: a URL the cache stored in an earlier run would be a hit.
        prefix, counter = f"{origin.url}?n={random.getrandbits(48):x}-", itertools.count()
        return lambda: request(f"{prefix}{next(counter)}")

    rows: list[RateRow] = []
    for conns in a.conn_list:
        per: dict[str, list[RateRow]] = {name: [] for name, _, _ in RUNS}
        for _rep in range(a.repeat):
            for name, key, new_urls in RUNS:
                setup = setups[key]
                make = unique() if new_urls else lambda: one
                r = measure_rate(setup, name, origin, make, conns, a, baselines[setup.name])
                benchlib.log(
                    f"{name:28} c={conns:<4} {r.rps:6.1f} req/s  p50 {r.p50_ms:6.2f}  "
                    f"p95 {r.p95_ms:6.2f}  p99 {r.p99_ms:6.2f}  max {r.max_ms:6.1f} ms  "
                    f"send lag p99 {r.lag_p99_ms:.2f} ms  "
                    f"non-200 {r.non_200} errors {r.errors}+{r.timeouts}t  "
                    f"origin served {r.origin_served}"
                )
                per[name].append(r)
        # The repetition with the median p95, so every column comes from one real run.
        chosen = {n: benchlib.median_by(rs, lambda r: r.p95_ms) for n, rs in per.items()}
        for name, base in BASES.items():
            chosen[name].ratio = benchlib.ratio(chosen[name].p95_ms, chosen[base].p95_ms)
        rows.extend(chosen.values())
    return rows


def print_rate(rows: list[RateRow], a: argparse.Namespace, load: float) -> None:
    print(
        f"# cache latency bench: {a.rate:g} req/s per connection (Poisson, open loop), "
        f"{a.duration:g}s runs, median p95 of {a.repeat}, {a.size} B body, "
        f"{benchlib.load_label(load)}"
    )
    head = ["setup", "conns", "offered req/s", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms"]
    head += ["errors", "CPU ms/req", "origin served", "p95 vs bare"]
    body = [
        [
            r.setup,
            r.connections,
            f"{r.offered:g}",
            f"{r.rps:.1f}",
            f"{r.p50_ms:.2f}",
            f"{r.p95_ms:.2f}",
            f"{r.p99_ms:.2f}",
            f"{r.max_ms:.1f}",
            r.non_200 + r.errors + r.timeouts,
            benchlib.cell(r.cpu_ms_per_req, ".2f"),
            r.origin_served,
            benchlib.cell(r.ratio, ".2f", "x"),
        ]
        for r in rows
    ]
    print(benchlib.table(head, body))
    print(
        "\nLatency: from the send (from the due time if the connection was still busy then) "
        "to the last body byte, 200 responses only; req/s counts those over the run and its "
        "drain. errors: non-200, socket errors and timeouts (split in the log lines above). "
        "CPU ms/req: the proxy's utime+stime / 200 responses."
    )


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    tools = benchlib.ensure_tools({"wrk": "wrk", "nginx": "nginx"})
    wrk = tools["wrk"]
    benchlib.raise_nofile()
    load = benchlib.load_at_start()
    bare = benchlib.Setup("bare", [], [])
    scripts = ["addons/cache.py"]
    if not a.alone:
        scripts = ["addons/leanchain.py", *scripts, "addons/runtime.py"]
    args = ["--set", "cache_default_ttl=1h"]
    if a.cpython_gc and not a.alone:
        args += ["--set", "server_gc_freeze=false", "--set", "server_gc_threshold=700,10,10"]
    cache = benchlib.Setup("cache", scripts, args)
    rows: list[benchlib.Row] = []
    rate: list[RateRow] = []
    with tempfile.TemporaryDirectory(prefix="waypost-bench-cache-") as tmpdir:
        tmp = Path(tmpdir)
        origin = benchlib.Origin(tools["nginx"], tmp, os.urandom(a.size))
        old = time.time() - 30 * 86400
        os.utime(origin.page, (old, old))
        try:
            origin.start()
            hit_lua = origin.wrk_script(tmp / "hit.lua")
            miss_lua = origin.wrk_script(tmp / "miss.lua", MISS_LUA_REQUEST.format(url=origin.url))
            baselines = {}
            for s in (bare, cache):
                benchlib.start_proxy(s, tmp, origin, a.start_timeout)
                assert s.child is not None
                baselines[s.name] = benchlib.proc_stat(s.child.pid)["fds"]
            if a.warmup > 0:
                for s in (bare, cache):
                    for lua in (hit_lua, miss_lua):
                        url = f"http://127.0.0.1:{s.port}/"
                        benchlib.run_wrk(wrk, lua, url, 10, a.warmup, a.threads, a.timeout)
            if a.rate:
                rate = rate_rows(a, {"bare": bare, "cache": cache}, origin, baselines)
            else:
                for conns in a.conn_list:
                    per: dict[str, list[benchlib.Row]] = {name: [] for name, _, _ in RUNS}
                    for _rep in range(a.repeat):
                        for name, key, new_urls in RUNS:
                            setup = bare if key == "bare" else cache
                            lua = miss_lua if new_urls else hit_lua
                            r = benchlib.measure(
                                setup, origin, wrk, lua, conns, a, baselines[setup.name]
                            )
                            r = replace(r, setup=name)
                            benchlib.log(
                                f"{name:28} c={conns:<4} {r.rps:7.0f} req/s  p95 {r.p95_ms:6.1f} ms"
                                f"  origin served {r.origin_served}"
                            )
                            per[name].append(r)
                    chosen = {name: benchlib.median_row(rs) for name, rs in per.items()}
                    for name, base in BASES.items():
                        chosen[name].ratio = benchlib.ratio(chosen[name].rps, chosen[base].rps)
                    rows.extend(chosen.values())
        finally:
            benchlib.stop_all([bare.child, cache.child, origin.child])
    if a.rate:
        print_rate(rate, a, load)
        return 0
    print(
        f"# cache bench: {a.duration:g}s runs, median of {a.repeat}, {a.size} B body, "
        f"{benchlib.load_label(load)}"
    )
    head = ["setup", "conns", "req/s", "p50 ms", "p95 ms", "p99 ms", "CPU ms/req"]
    head += ["origin served", "vs bare"]
    body = [
        [
            r.setup,
            r.connections,
            f"{r.rps:.0f}",
            f"{r.p50_ms:.1f}",
            f"{r.p95_ms:.1f}",
            f"{r.p99_ms:.1f}",
            benchlib.cell(r.cpu_ms_per_req, ".2f"),
            r.origin_served,
            benchlib.cell(r.ratio, ".2f", "x"),
        ]
        for r in rows
    ]
    print(benchlib.table(head, body))
    return 0


if __name__ == "__main__":
    benchlib.run(main)
