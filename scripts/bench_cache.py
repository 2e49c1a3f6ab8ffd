"""Cache benchmark: hit and miss throughput of `addons/cache.py` against bare mitmdump.

Usually started through `scripts/bench-cache`. Reuses `scripts/bench.py`'s nginx origin, wrk
runner and process handling (everything on 127.0.0.1, stopped by PID before exit).

    wrk (absolute-form GETs, keep-alive) -> mitmdump (-p 0) -> nginx (1 KB static file)

Four setups per connection count, interleaved per repetition so drift on a shared machine
hits them alike:
- bare, one URL          bare mitmdump, every request for the same URL
- cache, one URL         mitmdump -s addons/cache.py: after the first request every one is a HIT
- bare, unique URLs      bare mitmdump, every request for a new URL (`?n=<random>`)
- cache, unique URLs     every request a MISS that is fetched, stored and later evicted
The origin file's mtime is set 30 days back, so nginx's Last-Modified makes it heuristically
fresh (RFC 9111 §4.2.2) and `cache_default_ttl=1h` caps that at an hour.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (scripts/bench.py, next to this file)

MISS_LUA_REQUEST = """
math.randomseed(os.time() + tonumber(tostring({{}}):sub(8), 16))
request = function()
  return wrk.format("GET", "{url}?n=" .. math.random(1, 2000000000) .. "-" .. math.random(1, 2000000000))
end
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--repeat", type=int, default=3, help="runs per setup, median kept (default 3)")
    p.add_argument("--connections", default="10,100", help="comma-separated (default 10,100)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per setup")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", default="10s")
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument("--size", type=int, default=1024, help="origin body bytes (default 1024)")
    a = p.parse_args(argv)
    a.conn_list = [int(c) for c in a.connections.split(",") if c.strip()]
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    wrk, nginx = bench.ensure_tools()
    bench.raise_nofile()
    load = bench.loadavg()
    if load > 0.3 * (os.cpu_count() or 1):
        bench.log(f"WARNING: load average {load:.2f}: the CPUs are shared, numbers are noisy")
    bare = bench.Setup("bare", [], [])
    cache = bench.Setup("cache", ["addons/cache.py"], ["--set", "cache_default_ttl=1h"])
    rows: list[bench.Row] = []
    with tempfile.TemporaryDirectory(prefix="waypost-bench-cache-") as tmpdir:
        tmp = Path(tmpdir)
        origin = bench.Origin(nginx, tmp, a.size)
        page = tmp / "www" / bench.PAGE.lstrip("/")
        old = time.time() - 30 * 86400
        os.utime(page, (old, old))
        try:
            origin.start()
            host = f"127.0.0.1:{origin.port}"
            hit_lua, miss_lua = tmp / "hit.lua", tmp / "miss.lua"
            hit_lua.write_text(bench.WRK_LUA.format(url=origin.url, host=host))
            miss_lua.write_text(
                bench.WRK_LUA.format(url=origin.url, host=host)
                + MISS_LUA_REQUEST.format(url=origin.url)
            )
            baselines = {}
            for s in (bare, cache):
                bench.start_proxy(s, tmp, origin, a.start_timeout)
                assert s.child is not None
                baselines[s.name] = bench.proc_stat(s.child.pid)["fds"]
            if a.warmup > 0:
                for s in (bare, cache):
                    for lua in (hit_lua, miss_lua):
                        bench.run_wrk(wrk, lua, s.port, 10, a.threads, a.warmup, a.timeout)
            runs = [
                ("bare, one URL", bare, hit_lua),
                ("cache, one URL (HIT)", cache, hit_lua),
                ("bare, unique URLs", bare, miss_lua),
                ("cache, unique URLs (MISS)", cache, miss_lua),
            ]
            for conns in a.conn_list:
                per: dict[str, list[bench.Row]] = {name: [] for name, _, _ in runs}
                for _rep in range(a.repeat):
                    for name, setup, lua in runs:
                        r = bench.measure(setup, origin, wrk, lua, conns, a, baselines[setup.name])
                        r = replace(r, setup=name)
                        bench.log(
                            f"{name:28} c={conns:<4} {r.rps:7.0f} req/s  p95 {r.p95_ms:6.1f} ms"
                            f"  origin served {r.origin_served}"
                        )
                        per[name].append(r)
                chosen = {name: bench.median_row(rs) for name, rs in per.items()}
                for name, base in (
                    ("cache, one URL (HIT)", "bare, one URL"),
                    ("cache, unique URLs (MISS)", "bare, unique URLs"),
                ):
                    if chosen[base].rps:
                        chosen[name].ratio = chosen[name].rps / chosen[base].rps
                rows.extend(chosen.values())
        finally:
            for s in (bare, cache):
                if s.child:
                    s.child.stop()
            origin.stop()
    print(
        f"# cache bench: {a.duration:g}s runs, median of {a.repeat}, {a.size} B body, "
        f"load average {load:.2f} at start, {bench.loadavg():.2f} at end (2 shared cores: noisy)"
    )
    print(
        "| setup | conns | req/s | p50 ms | p95 ms | p99 ms | CPU ms/req | origin served | vs bare |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cpu = f"{r.cpu_ms_per_req:.2f}" if r.cpu_ms_per_req is not None else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio else "-"
        print(
            f"| {r.setup} | {r.connections} | {r.rps:.0f} | {r.p50_ms:.1f} | {r.p95_ms:.1f} | "
            f"{r.p99_ms:.1f} | {cpu} | {r.origin_served} | {ratio} |"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except bench.BenchError as e:
        bench.log(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
