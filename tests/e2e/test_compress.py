"""Compression through a real mitmdump: negotiation, skip rules, headers, metrics.

The origin (aiohttp, own thread) serves generated text with whatever headers the test asks
for; clients are httpx (raw bytes read undecoded, then decoded here with the codec libraries)
and curl (`--compressed`, its own decoders).
"""

from __future__ import annotations

import asyncio
import gzip
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import brotli
import httpx
import pytest
import zstandard
from aiohttp import web

from tests.conftest import MANAGEMENT, Proxy, serve_app, start_proxy

SCRIPT = ("addons/compress.py",)


def page(size: int) -> bytes:
    line = b"<li class='item'><a href='/p/%d'>Product %d</a> <span>%d.99</span></li>\n"
    out = b"".join(line % (i, i * 7 % 1000, i % 90) for i in range(size // 40 + 1))
    return out[:size]


def decode(coding: str | None, data: bytes) -> bytes:
    if coding is None:
        return data
    if coding == "gzip":
        return gzip.decompress(data)
    if coding == "br":
        return brotli.decompress(data)
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompress(data)
    raise AssertionError(coding)


# --- origin ------------------------------------------------------------------------------------


def _origin_app() -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        q = request.query
        size = int(q.get("size", "20000"))
        status = int(q.get("status", "200"))
        headers = {"Content-Type": q.get("type", "text/html; charset=utf-8")}
        for h in q.getall("h", []):
            name, _, value = h.partition(":")
            headers[name] = value
        body = page(size)
        if "gz" in q:
            body = gzip.compress(body, mtime=0)
            headers["Content-Encoding"] = "gzip"
        if "chunked" in q:
            resp = web.StreamResponse(status=status, headers=headers)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(body), 4096):
                await resp.write(body[i : i + 4096])
                await asyncio.sleep(0.01)
            await resp.write_eof()
            return resp
        if status in (204, 304):
            return web.Response(status=status, headers=headers)
        if "range" in q and request.headers.get("Range") == "bytes=0-1999":
            headers["Content-Range"] = f"bytes 0-1999/{len(body)}"
            return web.Response(status=206, body=body[:2000], headers=headers)
        return web.Response(status=status, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/page", handle)
    return app


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    with serve_app(_origin_app()) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    # A small off-loop threshold so the 20 KB default page goes through a worker thread and the
    # 4 KB ones do not: both paths are exercised.
    p = start_proxy(
        tmp_path_factory.mktemp("compress"),
        scripts=SCRIPT,
        options={"compress_offload_threshold": "16KB"},
    )
    yield p
    p.stop()


class Got:
    def __init__(self, r: httpx.Response, raw: bytes) -> None:
        self.status = r.status_code
        self.headers = r.headers
        self.raw = raw
        self.coding = r.headers.get("content-encoding")

    @property
    def body(self) -> bytes:
        return decode(self.coding, self.raw)


def get(p: Proxy, url: str, accept: str | None = None, method: str = "GET", **headers: str) -> Got:
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    # httpx adds its own Accept-Encoding unless told; None means: send none at all.
    h["Accept-Encoding"] = accept if accept is not None else ""
    with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
        req = c.build_request(method, url, headers=h)
        if accept is None:
            del req.headers["Accept-Encoding"]
        r = c.send(req, stream=True)
        try:
            raw = b"".join(r.iter_raw())
        finally:
            r.close()
    return Got(r, raw)


# --- negotiation -------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["gzip", "br", "zstd"])
def test_each_algorithm_round_trips(proxy: Proxy, origin: str, alg: str) -> None:
    url = f'{origin}/page?h=ETag:"v1"&h=Vary:Origin&h=Accept-Ranges:bytes'
    for size in (4000, 20000):  # inline and in a worker thread
        r = get(proxy, f"{url}&size={size}", accept=alg)
        assert r.status == 200
        assert r.coding == alg
        assert int(r.headers["content-length"]) == len(r.raw)
        assert len(r.raw) < size * 0.6
        assert r.body == page(size)
        assert r.headers["etag"] == 'W/"v1"'
        assert r.headers.get_list("vary") == ["Origin, Accept-Encoding"]
        assert "accept-ranges" not in r.headers


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("gzip, deflate, br, zstd", "zstd"),  # tie: the configured preference zstd, br, gzip
        ("gzip, deflate, br", "br"),
        ("gzip;q=1, br;q=0.5, zstd;q=0.1", "gzip"),
        ("br;q=0, zstd;q=0, *", "gzip"),
        ("*;q=0.2, br", "br"),
        ("x-gzip", "gzip"),
        ("gzip;q=0.5, identity", None),
        ("gzip;q=0, br;q=0, zstd;q=0", None),
        ("deflate", None),
        ("identity", None),
        ("", None),
        (None, None),
    ],
)
def test_q_values(proxy: Proxy, origin: str, accept: str | None, expected: str | None) -> None:
    r = get(proxy, f'{origin}/page?h=ETag:"v1"', accept=accept)
    assert r.coding == expected
    assert r.body == page(20000)
    # A compressible response varies on Accept-Encoding whether or not this client asked.
    assert r.headers["vary"] == "Accept-Encoding"
    assert r.headers["etag"] == ('"v1"' if expected is None else 'W/"v1"')
    assert int(r.headers["content-length"]) == len(r.raw)


# --- skip rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "method", "headers", "status", "vary"),
    [
        ("size=1000", "GET", {}, 200, False),  # under min_size
        ("type=image/png", "GET", {}, 200, False),
        ("type=application/octet-stream", "GET", {}, 200, False),
        ("h=Cache-Control:public,no-transform", "GET", {}, 200, False),
        ("", "GET", {"cache_control": "no-transform"}, 200, False),
        ("range=1", "GET", {"range": "bytes=0-1999"}, 206, False),
        ("", "HEAD", {}, 200, False),
        ("status=204", "GET", {}, 204, False),
        ("status=304", "GET", {"if_none_match": '"v1"'}, 304, False),
        ("h=Content-Digest:sha-256=:AAAA:", "GET", {}, 200, False),
    ],
)
def test_skipped_responses_pass_unchanged(
    proxy: Proxy,
    origin: str,
    query: str,
    method: str,
    headers: dict[str, str],
    status: int,
    vary: bool,
) -> None:
    r = get(proxy, f"{origin}/page?{query}", accept="gzip, br, zstd", method=method, **headers)
    assert r.status == status
    assert r.coding is None
    assert "vary" not in r.headers
    if method == "GET" and status == 200:
        size = 1000 if query == "size=1000" else 20000
        assert r.raw == page(size)
        assert int(r.headers["content-length"]) == size
    if status == 206:
        assert r.raw == page(20000)[:2000]
        assert r.headers["content-range"] == "bytes 0-1999/20000"


def test_304_for_the_compressed_variant_keeps_its_weak_etag(proxy: Proxy, origin: str) -> None:
    url = f'{origin}/page?status=304&h=ETag:"v1"'
    r = get(proxy, url, accept="gzip", if_none_match='W/"v1"')
    assert r.status == 304
    assert r.headers["etag"] == 'W/"v1"'
    assert r.headers["vary"] == "Accept-Encoding"
    r = get(proxy, url, accept="gzip", if_none_match='"v1"')  # the identity variant
    assert r.headers["etag"] == '"v1"'


def test_already_encoded_body_is_not_touched(proxy: Proxy, origin: str) -> None:
    r = get(proxy, f"{origin}/page?gz=1", accept="br, zstd")
    assert r.coding == "gzip"  # the origin's own, though the client did not offer it
    assert r.body == page(20000)
    assert r.raw == gzip.compress(page(20000), mtime=0)


def test_chunked_origin_response_is_compressed_without_content_length(
    proxy: Proxy, origin: str
) -> None:
    r = get(proxy, f"{origin}/page?chunked=1", accept="br")
    assert r.coding == "br"
    assert r.body == page(20000)
    assert r.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in r.headers


def test_streamed_bodies_are_not_compressed(tmp_path: Path, origin: str) -> None:
    p = start_proxy(tmp_path, scripts=SCRIPT, options={"stream_large_bodies": "8k"})
    try:
        r = get(p, f"{origin}/page", accept="gzip")  # 20 KB: over stream_large_bodies
        assert r.coding is None and r.raw == page(20000)
        r = get(p, f"{origin}/page?size=4000", accept="gzip")  # under it: held, compressed
        assert r.coding == "gzip" and r.body == page(4000)
    finally:
        p.stop()


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
@pytest.mark.parametrize("alg", ["gzip", "br", "zstd"])
def test_curl_decodes_to_the_original(proxy: Proxy, origin: str, tmp_path: Path, alg: str) -> None:
    version = subprocess.run(["curl", "--version"], capture_output=True, text=True, timeout=10)
    feature = {"gzip": "libz", "br": "brotli", "zstd": "zstd"}[alg]
    if feature not in version.stdout:
        pytest.skip(f"this curl cannot decode {alg}")
    out, head = tmp_path / "body", tmp_path / "head"
    subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-x", proxy.url, "--compressed",
         "-H", f"Accept-Encoding: {alg}", "-D", str(head), "-o", str(out), f"{origin}/page"],
        check=True,
        timeout=20,
    )  # fmt: skip
    assert re.search(rf"(?im)^content-encoding: {alg}\r?$", head.read_text())
    assert out.read_bytes() == page(20000)


# --- bundle: profile, metrics, access log ------------------------------------------------------

PROFILE = """\
logging: {level: info, format: json}
metrics: {enabled: true, host: 127.0.0.1, port: 0}
security:
  egress: {allowed_networks: [127.0.0.1/32]}
compression:
  enabled: true
  algorithms: [br, gzip]
  levels: {gzip: 1, br: 1, zstd: 1}
  min_size: 2KB
  content_types: [text/html]
"""


def scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
    out = {}
    for line in text.splitlines():
        if line.startswith("compression_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_bundle_profile_metrics_and_access_log(proxy_factory, tmp_path: Path, origin: str) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text(PROFILE)
    p = proxy_factory(options={"waypost_profile": str(prof)})
    mport = int(p.wait_for(MANAGEMENT).group(1))
    before = scrape(mport)
    assert before['compression_bytes_total{direction="in"}'] == 0

    r = get(p, f"{origin}/page", accept="zstd, br, gzip")  # zstd not in the profile's list
    assert r.coding == "br" and r.body == page(20000)
    assert get(p, f"{origin}/page", accept="zstd").coding is None
    assert get(p, f"{origin}/page?size=1500", accept="br").coding is None  # min_size 2KB
    assert get(p, f"{origin}/page?type=text/plain", accept="br").coding is None
    again = get(p, f"{origin}/page", accept="br")  # same body from the origin: the memo
    assert again.raw == r.raw

    m = scrape(mport)
    assert m['compression_bytes_total{direction="in"}'] == 2 * 20000
    assert m['compression_bytes_total{direction="out"}'] == 2 * len(r.raw)
    assert m['compression_responses_total{encoding="br"}'] == 2
    assert m['compression_responses_total{encoding="gzip"}'] == 0
    assert m['compression_memo_total{result="hit"}'] == 1
    assert m['compression_memo_total{result="miss"}'] == 1
    # the proxy's own byte counter sees the encoded bytes that went out
    deadline = time.monotonic() + 10
    while True:
        lines = [j for j in p.json_lines() if j.get("message") == "request" and "url" in j]
        if len(lines) >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [j.get("compression") for j in lines] == ["br", None, None, None, "br"]
    assert lines[0]["bytes_sent"] == len(r.raw)
