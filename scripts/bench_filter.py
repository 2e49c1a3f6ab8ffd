"""Micro-benchmark of the domain filter's index and of both filters' per-request hooks.

Usually started through `scripts/bench-filter`. Measures, in this process:

- building the suffix index from N generated names (default 1,000,000; 90% exact names, 10%
  `*.` wildcards): seconds and bytes (tracemalloc, and the process RSS growth);
- parsing the same entries as a hosts-format list file (`load_list`, what a reload costs);
- lookups (`HostIndex.match` and the whole `decide`): ns per call for exact hits, wildcard
  hits three labels deep and misses, with N entries and with 1,000, to show the cost does not
  grow with the list;
- the hooks as mitmproxy calls them (`Filter.requestheaders` on an allowed host and on a blocked
  one, `ContentFilter.responseheaders` on an allowed type): µs per call.

Numbers are wall-clock medians of several rounds in one process; on a shared machine compare
them with each other, not across runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import benchlib

sys.path.insert(0, str(benchlib.ROOT))
from mitmproxy.test import taddons, tflow  # noqa: E402

from addons import contentfilter as cf  # noqa: E402
from addons import filter as flt  # noqa: E402
from addons.kernel.hosts import HostIndex, Pattern, build_index  # noqa: E402


def rss_bytes() -> int:
    return benchlib.proc_status("self").get("VmRSS", 0) * 1024


def names(n: int) -> list[str]:
    rnd = random.Random(7)
    tlds = ("com", "net", "org", "io", "de", "co.uk", "example")
    return [f"ads-{i:07d}.tracker{rnd.randrange(5000)}.{rnd.choice(tlds)}" for i in range(n)]


def entries(hosts: Sequence[str]) -> list[Pattern]:
    return [Pattern(h, i % 10 == 0) for i, h in enumerate(hosts)]


def per_call_ns(fn: Callable[[str], object], args: Sequence[str], rounds: int = 7) -> float:
    """The fastest round's CPU ns per call (thread CPU time, min of rounds: the least noisy on
    a shared machine)."""
    times = []
    for _ in range(rounds):
        start = time.thread_time_ns()
        for a in args:
            fn(a)
        times.append((time.thread_time_ns() - start) / len(args))
    return min(times)


def lookup_cases(index: HostIndex[str], hosts: Sequence[str], n: int, tag: str) -> dict:
    rnd = random.Random(11)
    exact = [h for i, h in enumerate(hosts) if i % 10][:n]
    wild = ["a.b." + h for i, h in enumerate(hosts) if i % 10 == 0][:n]
    miss = [f"www.site{rnd.randrange(10**9)}.example.org" for _ in range(n)]
    rules = flt.Rules(blocked=(flt.Source("bench", "enforce", index),))
    cases = {}
    for label, sample in (("exact hit", exact), ("wildcard hit", wild), ("miss", miss)):
        assert all((index.match(h) is None) == (label == "miss") for h in sample[:1000])
        cases[f"match {label}, {tag}"] = (index.match, sample)
        cases[f"decide {label}, {tag}"] = (lambda h, r=rules: flt.decide(r, h), sample)
    return cases


def interleaved(cases: dict, rounds: int = 7) -> dict[str, float]:
    """ns per call of each case, rounds interleaved so machine drift hits all cases alike."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, (fn, args) in cases.items():
            ns = per_call_ns(fn, args, rounds=1)
            best[name] = min(best.get(name, ns), ns)
    return best


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--calls", type=int, default=100_000, help="calls per lookup measurement")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    logging.disable(logging.CRITICAL)  # the audit log would measure the log handler
    report: dict[str, object] = {"python": sys.version.split()[0], "entries": args.entries}

    hosts = names(args.entries)
    ents = entries(hosts)
    tmp = tempfile.TemporaryDirectory()
    path = Path(tmp.name) / "list.hosts"
    with path.open("w") as f:
        f.write("# generated\n127.0.0.1 localhost\n")
        for e in ents:
            f.write(f"||{e.name}^\n" if e.wildcard else f"0.0.0.0 {e.name}\n")

    # What a list file costs: parse time and the process's RSS growth, measured first, while
    # the allocator has no freed memory to reuse. AdBlock lines add two entries each.
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    loaded = flt.load_list(str(path), "bench")
    report["file_parse_s"] = round(time.perf_counter() - t0, 2)
    report["file_entries"] = loaded.stats.entries
    report["file_rss_growth_mb"] = round((rss_bytes() - rss0) / 2**20, 1)
    report["file_rss_bytes_per_entry"] = round((rss_bytes() - rss0) / loaded.stats.entries)
    del loaded
    gc.collect()

    # The index alone, by allocation: names are made inside the traced window, as a file's are.
    tracemalloc.start()
    t0 = time.perf_counter()
    big = build_index(
        (Pattern(f"ads-{i:07d}.tracker.example", i % 10 == 0) for i in range(args.entries)),
        "bench",
    )
    report["build_s_traced"] = round(time.perf_counter() - t0, 2)
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    report["index_mb_tracemalloc"] = round(traced / 2**20, 1)
    report["index_bytes_per_entry"] = round(traced / len(big))
    del big
    gc.collect()
    big = build_index(ents, "bench")
    small = build_index(ents[:1000], "bench")

    # The same number of calls against both indexes, so the two differ only in list size.
    cases = lookup_cases(big, hosts, args.calls, f"{args.entries} entries")
    cases |= lookup_cases(
        small, hosts[:1000] * (args.calls // 1000 + 1), args.calls, "1000 entries"
    )
    report["lookup_ns"] = {k: round(v) for k, v in sorted(interleaved(cases).items())}

    addon = flt.Filter()
    content = cf.ContentFilter()
    with taddons.context(addon, content) as tctx:
        tctx.configure(addon, filter_blocked=["*.ads.example"])
        # The big index as a list file's source, without parsing the file a third time.
        addon.rules = addon.rules._replace(
            blocked=addon.rules.blocked + (flt.Source("bench", "enforce", big),)
        )
        tctx.configure(
            content,
            content_filter_blocked_types=["application/x-msdownload", "video/*", "/x-.*/"],
        )
        f = tflow.tflow(resp=True)
        f.response.headers["content-type"] = "text/html; charset=utf-8"
        resp = f.response

        # One flow per case: setting request.host costs more than the hook itself.
        f.request.host = "www.site1.example.org"
        blocked = tflow.tflow()
        blocked.request.host = hosts[1]

        def hook_allowed(_: str) -> None:
            f.response = None
            addon.requestheaders(f)

        def hook_blocked(_: str) -> None:
            blocked.response = None
            blocked.metadata.clear()
            addon.requestheaders(blocked)

        def hook_content(_: str) -> None:
            f.response = resp
            content.responseheaders(f)

        miss = hit = [""] * 20_000
        report["hook_us"] = {
            "filter.requestheaders allowed": round(per_call_ns(hook_allowed, miss) / 1000, 2),
            "filter.requestheaders blocked (403 built)": round(
                per_call_ns(hook_blocked, hit) / 1000, 2
            ),
            "contentfilter.responseheaders allowed": round(
                per_call_ns(hook_content, miss) / 1000, 2
            ),
        }
    report["rss_total_mb"] = round(rss_bytes() / 2**20, 1)
    tmp.cleanup()

    if args.json:
        print(json.dumps(report))
        return 0
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:45} {v}")
        else:
            print(f"{key:47} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
