"""What compressing a response costs and saves, per algorithm, level and body size.

    scripts/compress-cost                    # the table in docs/performance.md (generated corpus)
    scripts/compress-cost --files a.html b.js --sizes 10240,102400

The corpus is generated (seeded, so every run compresses the same bytes): an HTML product
listing page, a JSON API answer, and prose, each from a vocabulary of a few thousand
pseudo-words drawn with Zipf-like frequencies, ids, prices, timestamps and UUIDs, so it
compresses about like real pages (compare with `--files` on real ones; docs/performance.md has
both). Each body is cut to the exact size. Reported per (kind, size, algorithm, level): the
median CPU time of one compression in microseconds (the thread's CPU clock, repeated until ~30
ms of work per cell) and the bytes saved in percent. CPU time rather than wall time, so other
work on a shared machine does not count; caches shared with that work still make it somewhat
noisy. The savings are exact.

Also reported: the cost of one `asyncio.to_thread` round trip, which is what moving a body off
the event loop adds, so the off-loop threshold can be read from the same run.

Usable as a module: `corpus(kind, size)` is what `scripts/bench-compress` serves.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import statistics
import string
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import benchlib
import brotli
import zstandard

KINDS = ("html", "json", "text")
SIZES = (1024, 10 * 1024, 100 * 1024, 1024 * 1024)
# Candidate levels: the fast end of each library, the usual web-server defaults (gzip 6,
# brotli 4-5 for dynamic content, zstd 3) and mitmproxy 11's maxima (gzip 9, brotli 11).
LEVELS: dict[str, tuple[int, ...]] = {
    "gzip": (1, 4, 6, 9),
    "br": (0, 1, 3, 4, 5, 6, 11),
    "zstd": (1, 3, 6, 10),
}


def compressor(algorithm: str, level: int) -> Callable[[bytes], bytes]:
    """The compression function Waypost uses for `algorithm` at `level` (see addons/compress)."""
    if algorithm == "gzip":
        return lambda data: gzip.compress(data, compresslevel=level, mtime=0)
    if algorithm == "br":
        return lambda data: brotli.compress(data, quality=level)
    if algorithm == "zstd":
        c = zstandard.ZstdCompressor(level=level)
        return c.compress
    raise ValueError(algorithm)


# --- corpus ------------------------------------------------------------------------------------


def _vocabulary(rng: random.Random, n: int = 4000) -> tuple[list[str], list[float]]:
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in "aeiou"] + ["th", "st", "qu", "ch"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    ordered = sorted(words, key=lambda w: (len(w), w))
    rng.shuffle(ordered)
    weights = [1.0 / (rank + 1) for rank in range(len(ordered))]  # Zipf, s = 1
    return ordered, weights


class _Words:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.words, self.weights = _vocabulary(self.rng)

    def take(self, n: int) -> list[str]:
        return self.rng.choices(self.words, self.weights, k=n)

    def sentence(self) -> str:
        words = self.take(self.rng.randint(5, 22))
        return " ".join(words).capitalize() + self.rng.choice(".....?!")

    def title(self) -> str:
        return " ".join(w.capitalize() for w in self.take(self.rng.randint(2, 5)))


def _html(w: _Words, size: int) -> str:
    r = w.rng
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{w.title()} | Shop</title>\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="stylesheet" href="/static/css/main.4f9a1c.css">\n</head>\n<body>\n'
        '<header class="site-header"><nav class="nav nav--primary"><ul>'
        + "".join(
            f'<li class="nav__item"><a href="/c/{x}">{x.capitalize()}</a></li>' for x in w.take(8)
        )
        + '</ul></nav></header>\n<main class="container">\n'
        f'<h1 class="page-title">{w.title()}</h1>\n'
    ]
    n = 0
    while sum(map(len, parts)) < size:
        n += 1
        pid = r.randint(10000, 999999)
        price = r.randint(100, 99999) / 100
        stars = r.randint(1, 5)
        parts.append(
            f'<article class="card product" data-id="{pid}" data-sku="{uuid.UUID(int=r.getrandbits(128))}">\n'
            f'  <a class="card__link" href="/p/{pid}/{"-".join(w.take(3))}">\n'
            f'    <img class="card__img" src="/img/{pid:x}.webp" alt="{w.title()}" loading="lazy" width="320" height="240">\n'
            f'    <h2 class="card__title">{w.title()}</h2>\n  </a>\n'
            f'  <p class="card__text">{" ".join(w.sentence() for _ in range(r.randint(1, 3)))}</p>\n'
            f'  <div class="card__meta"><span class="price">${price:.2f}</span> '
            f'<span class="rating rating--{stars}" aria-label="{stars} of 5 stars"></span> '
            f'<span class="reviews">{r.randint(0, 4000)} reviews</span></div>\n'
            f'  <button class="btn btn--primary add-to-cart" data-id="{pid}">Add to cart</button>\n'
            "</article>\n"
        )
        if n % 12 == 0:
            parts.append(f'<section class="promo"><p>{w.sentence()} {w.sentence()}</p></section>\n')
    parts.append('</main>\n<footer class="site-footer">&copy; 2026</footer>\n</body>\n</html>\n')
    return "".join(parts)


def _json(w: _Words, size: int) -> str:
    r = w.rng
    items = []
    total = 0
    while total < size:
        item = {
            "id": r.randint(1, 10**9),
            "uuid": str(uuid.UUID(int=r.getrandbits(128))),
            "name": w.title(),
            "description": w.sentence(),
            "price": {"amount": r.randint(100, 999999) / 100, "currency": r.choice(("EUR", "USD"))},
            "in_stock": r.random() < 0.8,
            "tags": w.take(r.randint(0, 5)),
            "created_at": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(1.7e9 + r.randint(0, 10**8))
            ),
            "seller": {
                "id": r.randint(1, 50000),
                "name": w.title(),
                "rating": round(r.random() * 5, 2),
            },
            "sku": "".join(r.choices(string.ascii_uppercase + string.digits, k=10)),
        }
        text = json.dumps(item)
        total += len(text) + 2
        items.append(item)
    return json.dumps({"page": 1, "per_page": len(items), "items": items}, indent=None)


def _text(w: _Words, size: int) -> str:
    paragraphs = []
    total = 0
    while total < size:
        p = " ".join(w.sentence() for _ in range(w.rng.randint(3, 9)))
        paragraphs.append(p)
        total += len(p) + 2
    return "\n\n".join(paragraphs)


_GENERATORS = {"html": _html, "json": _json, "text": _text}
CONTENT_TYPES = {
    "html": "text/html; charset=utf-8",
    "json": "application/json",
    "text": "text/plain; charset=utf-8",
}


def corpus(kind: str, size: int, seed: int = 4) -> bytes:
    """`size` bytes of generated `kind` ("html", "json", "text"); the same bytes every call."""
    return _GENERATORS[kind](_Words(seed), size).encode()[:size]


# --- measurement -------------------------------------------------------------------------------


def time_us(fn: Callable[[], object], budget: float = 0.03) -> float:
    """Median CPU microseconds of one call (this thread's CPU clock, so time the scheduler gave
    to other processes on a shared machine does not count), over repetitions filling about
    `budget` CPU seconds."""
    fn()  # warm
    samples = []
    spent = 0.0
    while spent < budget or len(samples) < 5:
        t0 = time.thread_time()
        fn()
        dt = time.thread_time() - t0
        samples.append(dt)
        spent += dt
        if len(samples) >= 2000:
            break
    return statistics.median(samples) * 1e6


def to_thread_us(n: int = 300) -> float:
    async def main() -> float:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await asyncio.to_thread(bytes)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e6

    return asyncio.run(main())


def hook_us(algorithm: str | None, size: int, memo: bool, kind: str = "html") -> float:
    """Median CPU microseconds of addons/compress.py's `response` hook on a cache hit: the same
    identity body object every time (as a cache hands it out), this coding accepted (None: no
    Accept-Encoding, so the hook only adds Vary)."""
    from mitmproxy import http
    from mitmproxy.test import tflow

    from addons.compress import Compress

    addon = Compress()
    if not memo:
        addon.s = addon.s._replace(memo_size=0)
    stored = http.Response.make(200, corpus(kind, size), {"Content-Type": CONTENT_TYPES[kind]})
    f = tflow.tflow()
    f.live = True
    if algorithm:
        f.request.headers["Accept-Encoding"] = algorithm
    samples = []
    spent = 0.0
    while spent < 0.05 or len(samples) < 20:
        f.response = stored.copy()  # shares the body's bytes object, as a cache hit does
        t0 = time.thread_time()
        ret = addon.response(f)
        if ret is not None:  # over the off-loop threshold: run the thread's work inline here
            asyncio.run(ret)
        dt = time.thread_time() - t0
        samples.append(dt)
        spent += dt
        if len(samples) >= 5000:
            break
    return statistics.median(samples[1:]) * 1e6


def size_label(n: int) -> str:
    return f"{n // (1024 * 1024)} MB" if n >= 1024 * 1024 else f"{n // 1024} KB"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scripts/compress-cost", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="body sizes in bytes")
    p.add_argument("--kinds", default=",".join(KINDS), help="generated kinds: html,json,text")
    p.add_argument("--files", nargs="*", default=[], help="real files to measure as well")
    p.add_argument(
        "--levels",
        default="",
        help="override, e.g. gzip=6,br=4,zstd=3 (one level each); default: the candidate grid",
    )
    p.add_argument("--json", action="store_true", help="JSON rows on stdout instead of a table")
    p.add_argument(
        "--hook",
        action="store_true",
        help="instead: CPU us of the compress addon's response hook on a cache hit, per size and "
        "coding, with and without the memo",
    )
    a = p.parse_args(argv)
    if a.hook:
        sys.path.insert(0, str(benchlib.ROOT))
        head = ["body", "coding", "hook us, memo off", "hook us, memo on"]
        print(benchlib.table(head, []))  # the rows as they are measured
        for size in map(int, a.sizes.split(",")):
            for alg in (None, "gzip", "br", "zstd"):
                off = hook_us(alg, size, memo=False)
                on = hook_us(alg, size, memo=True)
                label = f"html {size_label(size)}"
                print(benchlib.md_row([label, alg or "none asked", f"{off:.0f}", f"{on:.1f}"]))
        return 0
    levels = LEVELS
    if a.levels:
        levels = {}
        for item in a.levels.split(","):
            alg, _, lvl = item.partition("=")
            levels[alg.strip()] = (int(lvl),)
    bodies: list[tuple[str, bytes]] = []
    for kind in filter(None, a.kinds.split(",")):
        for size in map(int, a.sizes.split(",")):
            bodies.append((f"{kind} {size_label(size)}", corpus(kind, size)))
    for f in a.files:
        bodies.append((Path(f).name, Path(f).read_bytes()))
    rows = []
    for label, body in bodies:
        for alg, lvls in levels.items():
            for lvl in lvls:
                fn = compressor(alg, lvl)
                out = fn(body)
                rows.append(
                    {
                        "body": label,
                        "bytes": len(body),
                        "algorithm": alg,
                        "level": lvl,
                        "us": round(time_us(lambda fn=fn, body=body: fn(body)), 1),
                        "saved_pct": round(100 * (1 - len(out) / len(body)), 1),
                        "out_bytes": len(out),
                    }
                )
    hop = to_thread_us()
    if a.json:
        json.dump({"to_thread_us": round(hop, 1), "rows": rows}, sys.stdout, indent=1)
        print()
        return 0
    print(
        f"Python {sys.version.split()[0]}, zlib {zlib.ZLIB_RUNTIME_VERSION}, "
        f"brotli {brotli.__version__}, zstandard {zstandard.__version__}"
    )
    print(f"one asyncio.to_thread round trip: {hop:.0f} us (median)\n")
    head = ["body", "bytes", "algorithm", "level", "us", "MB/s", "saved"]
    body = [
        [
            r["body"],
            r["bytes"],
            r["algorithm"],
            r["level"],
            f"{r['us']:.0f}",
            f"{r['bytes'] / r['us'] if r['us'] else 0.0:.0f}",
            f"{r['saved_pct']:.1f}%",
        ]
        for r in rows
    ]
    print(benchlib.table(head, body))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
