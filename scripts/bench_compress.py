"""Load test of compression: bare mitmdump against mitmdump with addons/compress.py.

Usually started through `scripts/bench-compress`. Uses scripts/benchlib.py's machinery (nginx
origin, wrk, interleaved runs, median of repetitions, CPU per request), with a generated HTML
page (scripts/compress_cost.py's corpus) as the origin's file and `Accept-Encoding` sent by
wrk. The setups, all in the same run:

    bare          mitmdump, no addon (identity bodies)
    <alg>         compress addon, one coding, memo off: every response compressed
    <alg>+memo    the same with the memo on (the origin sends equal bodies: hash + lookup)
    hit           scripts/bench_hit.py answers every request from memory, as a cache hit does
    hit+<alg>     ... and compress compresses each hit, memo off
    hit+<alg>+memo ... memo on: the hit's body object repeats, so a lookup replaces compression

    scripts/bench-compress --size 10240 --algorithms gzip,zstd --duration 5 --repeat 3

Every process listens on 127.0.0.1 only and is stopped by PID before exit.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import benchlib
import compress_cost

ROOT = benchlib.ROOT


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench-compress", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=10240, help="page size in bytes (default 10240)")
    p.add_argument("--kind", default="html", help="generated page kind: html, json, text")
    p.add_argument("--algorithms", default="gzip,br,zstd", help="codings to bench, one setup each")
    p.add_argument("--connections", type=int, default=10, help="wrk connections (default 10)")
    p.add_argument("--duration", type=float, default=5, help="seconds per run (default 5)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions, median reported")
    p.add_argument("--warmup", type=float, default=2, help="warm-up seconds per setup")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--timeout", default="10s", help="wrk per-request timeout")
    p.add_argument("--no-memo", action="store_true", help="skip the +memo setups")
    p.add_argument("--no-hit", action="store_true", help="skip the cache-hit setups")
    p.add_argument("--start-timeout", type=float, default=30)
    return p.parse_args(argv)


def setups(a: argparse.Namespace) -> list[benchlib.Setup]:
    comp = str(ROOT / "addons/compress.py")
    hit = str(ROOT / "scripts/bench_hit.py")
    out = [benchlib.Setup("bare", [], [])]
    algs = [x.strip() for x in a.algorithms.split(",") if x.strip()]
    for prefix, scripts in (("", []), ("hit", [hit])):
        if prefix and a.no_hit:
            continue
        if prefix:
            out.append(benchlib.Setup("hit", scripts, []))
        for alg in algs:
            name = f"{prefix}+{alg}" if prefix else alg
            opts = ["--set", f"compress_algorithms={alg}"]
            out.append(
                benchlib.Setup(name, [*scripts, comp], [*opts, "--set", "compress_memo_size=0"])
            )
            if not a.no_memo:
                out.append(benchlib.Setup(f"{name}+memo", [*scripts, comp], opts))
    return out


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    tools = benchlib.ensure_tools({"wrk": "wrk", "nginx": "nginx"})
    wrk = tools["wrk"]
    benchlib.raise_nofile()
    import mitmproxy.version

    body = compress_cost.corpus(a.kind, a.size)
    ctype = compress_cost.CONTENT_TYPES[a.kind].split(";")[0]
    load_start = benchlib.load_at_start()
    ss = setups(a)
    rows: list[benchlib.Row] = []
    with tempfile.TemporaryDirectory(prefix="waypost-bench-compress-") as tmpdir:
        tmp = Path(tmpdir)
        origin = benchlib.Origin(tools["nginx"], tmp, body, content_type=ctype)
        try:
            origin.start()
            lua = origin.wrk_script(
                tmp / "absolute.lua", 'wrk.headers["Accept-Encoding"] = "gzip, deflate, br, zstd"\n'
            )
            baselines = {}
            for s in ss:
                benchlib.start_proxy(s, tmp, origin, a.start_timeout)
                assert s.child is not None
                baselines[s.name] = benchlib.proc_stat(s.child.pid)["fds"]
            if a.warmup > 0:
                for s in ss:
                    url = f"http://127.0.0.1:{s.port}/"
                    benchlib.run_wrk(wrk, lua, url, a.connections, a.warmup, 1, a.timeout)
            per: dict[str, list[benchlib.Row]] = {s.name: [] for s in ss}
            for _ in range(a.repeat):
                for s in ss:
                    r = benchlib.measure(s, origin, wrk, lua, a.connections, a, baselines[s.name])
                    benchlib.log(f"{s.name:18} {r.rps:7.0f} req/s  CPU {r.cpu_ms_per_req} ms/req")
                    per[s.name].append(r)
            chosen = [benchlib.median_row(per[s.name]) for s in ss]
            base = {"bare": chosen[0]}
            for r in chosen:
                if r.setup.startswith("hit") and r.setup != "hit":
                    ref = next(x for x in chosen if x.setup == "hit")
                else:
                    ref = base["bare"]
                if r is not ref:
                    r.ratio = benchlib.ratio(r.rps, ref.rps)
                rows.append(r)
        finally:
            benchlib.stop_all([*(s.child for s in ss), origin.child])
    print(
        f"mitmproxy {mitmproxy.version.VERSION}, Python {sys.version.split()[0]}, "
        f"{a.kind} page of {a.size} bytes ({ctype}), {a.connections} connections, "
        f"{a.duration:g}s x {a.repeat} (median), {benchlib.load_label(load_start)}"
    )
    head = ["setup", "req/s", "p50 ms", "p95 ms", "CPU ms/req", "ratio"]
    body = [
        [
            r.setup,
            f"{r.rps:.0f}",
            f"{r.p50_ms:.1f}",
            f"{r.p95_ms:.1f}",
            benchlib.cell(r.cpu_ms_per_req, ".2f"),
            benchlib.cell(r.ratio, ".2f", "x"),
        ]
        for r in rows
    ]
    print(benchlib.table(head, body))
    print("ratio: against bare for the plain setups, against `hit` for the hit+ setups")
    for s in ss:
        print(f"{s.name}: {shlex.join([*s.scripts, *s.args])}")
    return 0


if __name__ == "__main__":
    benchlib.run(main)
