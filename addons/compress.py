"""Compress: gzip, brotli or zstd response bodies for clients that ask for them.

The coding is chosen from the request's `Accept-Encoding` (RFC 9110 §12.5.3: q-values, `q=0`
refuses, `*` stands for every coding not listed, `identity` preferred above every coding means
no compression, no header means no compression); ties go to the order of
`compress_algorithms`. A response is compressed only when all hold: it has a body that was
held whole (never a streamed one), at least `compress_min_size` bytes; a status with content
(not 1xx, 204, 206, 304) and no `Content-Range`; not an answer to HEAD; no `Content-Encoding`
yet; a `Content-Type` in `compress_content_types`; no `Cache-Control: no-transform` on the
request or response (RFC 9111 §5.2); no digest header (`Content-Digest`, `Repr-Digest`,
`Digest`, `Content-MD5`), which compression would make wrong.

Every response that qualifies gets `Vary: Accept-Encoding` (merged into an existing `Vary`),
also when this client did not ask for compression, so caches downstream keep the variants
apart. A compressed response gets `Content-Encoding`, a correct `Content-Length` (none when it
is sent chunked), its strong `ETag` weakened (`W/"..."`: the bytes differ from the origin's,
RFC 9110 §8.8.1) and no `Accept-Ranges` (ranges of the encoded body are not served). A 304
answering a client that validated the compressed variant (`If-None-Match: W/"x"`) gets the
same weak ETag and Vary (RFC 9110 §15.4.5).

Levels are explicit (`compress_gzip_level`, `compress_br_level`, `compress_zstd_level`): the
libraries are called directly, not `Message.encode()`, whose mitmproxy 11 defaults (gzip 9,
brotli 11) cost up to a second per 100 KB. Bodies of `compress_offload_threshold` bytes or more
are compressed in a worker thread (`asyncio.to_thread`; the three libraries release the GIL),
smaller ones inline, where the thread hop would cost more than the work.

Encoded bodies are memoised by (coding, identity body) in an LRU of `compress_memo_size` bytes:
a cache hit hands out the same body object each time, so its hash is computed once and a
repeated hit costs a dictionary lookup instead of a compression (docs/performance.md has the
measurement). Identical bodies from the origin hit the memo too, after one hash of the body.

Runs in `response`, after the cache (which stores the identity body it got from the origin and
answers hits in `request`), so hits are compressed for each client as it asks. The chosen
coding is recorded as `record(flow)["compression"]` for the access log.

Metrics (on the metrics addon's registry): `compression_bytes_total{direction="in"|"out"}`
(identity bytes taken in, encoded bytes sent out), `compression_responses_total{encoding}`,
`compression_memo_total{result="hit"|"miss"}`.

Hooks: response. Options: compress_enabled, compress_algorithms, compress_gzip_level,
compress_br_level, compress_zstd_level, compress_min_size, compress_content_types,
compress_offload_threshold, compress_memo_size.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import re
import threading
import zlib
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import brotli
import zstandard
from cachetools import LRUCache
from mitmproxy import ctx, exceptions, http
from prometheus_client.core import CounterMetricFamily, Metric

from addons.kernel.options import Option, declare, once, size
from addons.kernel.record import record
from addons.schema import COMPRESSIBLE_TYPES as DEFAULT_CONTENT_TYPES

log = logging.getLogger("waypost.compress")

ALGORITHMS = ("zstd", "br", "gzip")
DEFAULT_ALGORITHMS = ["zstd", "br", "gzip"]
# Level ranges each library accepts. zstd stops at 19: levels 20-22 use windows over 8 MB, which
# browsers refuse to decode (RFC 8878 §3.1.1.1.2 recommends at most 8 MB for HTTP).
LEVEL_RANGES = {"gzip": (1, 9), "br": (0, 11), "zstd": (1, 19)}
DEFAULT_LEVELS = {"gzip": 4, "br": 3, "zstd": 3}
DEFAULT_MIN_SIZE = "1KB"
DEFAULT_OFFLOAD_THRESHOLD = "32KB"
DEFAULT_MEMO_SIZE = "16MB"

OPTIONS: tuple[Option, ...] = (
    Option("compress_enabled", bool, True, "Compress response bodies for clients that ask."),
    Option(
        "compress_algorithms",
        Sequence[str],
        list(DEFAULT_ALGORITHMS),
        "Codings to offer (zstd, br, gzip), in order of preference when the client's q-values tie.",
    ),
    *(
        Option(
            f"compress_{alg}_level",
            int,
            DEFAULT_LEVELS[alg],
            f"Compression level for {alg} ({LEVEL_RANGES[alg][0]}-{LEVEL_RANGES[alg][1]}); "
            "higher is smaller and slower.",
        )
        for alg in ALGORITHMS
    ),
    Option(
        "compress_min_size",
        str,
        DEFAULT_MIN_SIZE,
        "Smallest body to compress (e.g. 1KB; 1KB = 1024 bytes).",
    ),
    Option(
        "compress_content_types",
        Sequence[str],
        list(DEFAULT_CONTENT_TYPES),
        "Media types to compress: text/html, text/* or */*+json patterns (parameters ignored).",
    ),
    Option(
        "compress_offload_threshold",
        str,
        DEFAULT_OFFLOAD_THRESHOLD,
        "Bodies of this size or more are compressed in a worker thread, off the event loop.",
    ),
    Option(
        "compress_memo_size",
        str,
        DEFAULT_MEMO_SIZE,
        "Memory for memoised encoded bodies (identity plus encoded bytes); 0 turns it off.",
    ),
)

_MEDIA_RANGE = re.compile(r"[a-z0-9*!#$&^_.+-]+/[a-z0-9*!#$&^_.+-]+")
# RFC 9110 §12.4.2 qvalue; anything else makes the entry void.
_QVALUE = re.compile(r"0(\.\d{0,3})?|1(\.0{0,3})?")
_NO_COMPRESS_STATUS = frozenset({204, 206, 304})
_DIGESTS = (b"content-digest", b"repr-digest", b"digest", b"content-md5")
RESPONSE_FIELDS = frozenset(
    {b"content-encoding", b"content-type", b"content-range", b"cache-control", b"vary", *_DIGESTS}
)
REQUEST_FIELDS = frozenset({b"accept-encoding", b"cache-control"})
_ETAG = frozenset({b"etag"})
_IF_NONE_MATCH = frozenset({b"if-none-match"})
_MEMO_MAX_KEYS = 4096  # per-header-value memos (Accept-Encoding, Content-Type)
_NO_TRANSFORM = re.compile(r"(?:^|,)\s*no-transform\s*(?:,|$|=)", re.IGNORECASE)


# --- pure decisions ----------------------------------------------------------------------------


def parse_accept_encoding(value: str) -> dict[str, float]:
    """`Accept-Encoding` as {coding: q}, codings lowercased, `x-gzip` as `gzip`.

    An entry with an invalid q-value is dropped (it never makes a coding acceptable); a coding
    listed twice keeps its lowest q, so a refusal is never overridden.
    """
    out: dict[str, float] = {}
    for item in value.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        if coding == "x-gzip":  # RFC 9110 §8.4.1.3
            coding = "gzip"
        q = 1.0
        for param in params.split(";"):
            name, _, val = param.partition("=")
            if name.strip().lower() == "q":
                val = val.strip()
                if not _QVALUE.fullmatch(val):
                    q = -1.0
                    break
                q = float(val)
        if q < 0:
            continue
        out[coding] = min(q, out.get(coding, q))
    return out


def negotiate(accept: str | None, algorithms: Sequence[str]) -> str | None:
    """The coding to send for this `Accept-Encoding` (None: identity).

    No header: identity (RFC 9110 allows any coding then, but clients that send nothing
    are often tools that cannot decode). The highest q among `algorithms` wins, ties in the
    order of `algorithms`; a coding not listed takes the q of `*` if there is one. `identity`
    listed with a higher q than the best coding keeps the body as it is.
    """
    if accept is None:
        return None
    prefs = parse_accept_encoding(accept)
    star = prefs.get("*", 0.0)
    best, best_q = None, 0.0
    for alg in algorithms:
        q = prefs.get(alg, star)
        if q > best_q:
            best, best_q = alg, q
    if best is None:
        return None
    identity = prefs.get("identity")
    if identity is not None and identity > best_q:
        return None
    return best


def compile_content_types(patterns: Sequence[str]) -> re.Pattern[str]:
    """One regex over lowercased media types (no parameters) for the allowlist patterns
    (`text/html`, `text/*`, `*/*+json`); raises ValueError naming a bad entry."""
    parts = []
    for p in patterns:
        pat = p.strip().lower()
        if not _MEDIA_RANGE.fullmatch(pat):
            raise ValueError(
                f"{p!r} is not a media type pattern (e.g. text/html, text/*, */*+json)"
            )
        parts.append(fnmatch.translate(pat))
    return re.compile("|".join(parts) if parts else r"(?!)")


def media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


def no_transform(cache_control: str | None) -> bool:
    return bool(cache_control) and _NO_TRANSFORM.search(cache_control) is not None


Fields = dict[bytes, list[bytes]]


def scan(fields: Iterable[tuple[bytes, bytes]], wanted: frozenset[bytes]) -> Fields:
    """The values of the `wanted` (lowercase) fields, in one pass over the raw header fields:
    mitmproxy's `Headers.get` walks and lowercases every field on each call."""
    found: Fields = {}
    for name, value in fields:
        lname = name.lower()
        if lname in wanted:
            if lname in found:
                found[lname].append(value)
            else:
                found[lname] = [value]
    return found


def joined(found: Fields, name: bytes) -> str | None:
    """A field's values as one string (RFC 9110 §5.3 list combination), or None."""
    values = found.get(name)
    return None if values is None else b", ".join(values).decode("latin-1")


def precheck(
    method: str, status: int, body: bytes | None, streamed: bool, min_size: int
) -> str | None:
    """The skip reasons that need no header: most relayed responses stop here."""
    if streamed or body is None:
        return "streamed"
    if method == "HEAD":
        return "head"
    if status < 200 or status in _NO_COMPRESS_STATUS:
        return "status"
    if len(body) < min_size:
        return "small"
    return None


def header_check(
    response: Fields, request_cache_control: str | None, type_allowed: Callable[[bytes], bool]
) -> str | None:
    """The skip reasons read from the headers (`response` from `scan(..., RESPONSE_FIELDS)`)."""
    ce = joined(response, b"content-encoding")
    if ce and ce.strip().lower() != "identity":
        return "encoded"
    ct = response.get(b"content-type")
    if not ct or not type_allowed(ct[0]):
        return "type"
    if b"content-range" in response:
        return "range"
    if no_transform(joined(response, b"cache-control")) or no_transform(request_cache_control):
        return "no-transform"
    if any(d in response for d in _DIGESTS):
        return "digest"
    return None


def skip_reason(
    method: str,
    status: int,
    request_headers: http.Headers,
    response_headers: http.Headers,
    body: bytes | None,
    streamed: bool,
    min_size: int,
    type_allowed: Callable[[bytes], bool],
) -> str | None:
    """Why this response must not be compressed, or None if it may be (for some client)."""
    return precheck(method, status, body, streamed, min_size) or header_check(
        scan(response_headers.fields, RESPONSE_FIELDS),
        joined(scan(request_headers.fields, REQUEST_FIELDS), b"cache-control"),
        type_allowed,
    )


def merge_vary(values: Sequence[str]) -> str | None:
    """The one `Vary` value to send with Accept-Encoding merged in, or None if the existing
    fields already cover it (`*` or accept-encoding present)."""
    tokens = [t.strip() for v in values for t in v.split(",") if t.strip()]
    lowered = {t.lower() for t in tokens}
    if "*" in lowered or "accept-encoding" in lowered:
        return None
    return ", ".join([*tokens, "Accept-Encoding"])


def etag_for_304(etag: str | None, if_none_match: str | None) -> str | None:
    """The weakened ETag for a 304 whose client validated the compressed variant (its
    If-None-Match holds `W/` + the origin's strong tag, as this addon sent it), else None.

    RFC 9110 §15.4.5: a 304 carries the ETag and Vary the 200 would have carried.
    """
    if not etag or not if_none_match:
        return None
    tag = etag.strip()
    if not tag.startswith('"'):
        return None
    weak = "W/" + tag
    if any(t.strip() == weak for t in if_none_match.split(",")):
        return weak
    return None


def weaken_etag(value: str) -> str:
    """A strong entity tag made weak (`"x"` -> `W/"x"`); weak or malformed ones unchanged."""
    v = value.strip()
    return "W/" + v if v.startswith('"') else value


# --- compression -------------------------------------------------------------------------------

_local = threading.local()


def compress(algorithm: str, level: int, data: bytes) -> bytes:
    """`data` encoded with `algorithm` at `level`; safe to call from several threads."""
    if algorithm == "gzip":
        return zlib.compress(data, level, wbits=31)  # 31: gzip header and trailer, mtime 0
    if algorithm == "br":
        return brotli.compress(data, quality=level)
    if algorithm == "zstd":
        # ZstdCompressor objects must not be shared between threads: one per thread and level.
        compressors: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "zstd", None)
        if compressors is None:
            compressors = _local.zstd = {}
        c = compressors.get(level)
        if c is None:
            c = compressors[level] = zstandard.ZstdCompressor(level=level)
        return c.compress(data)
    raise ValueError(f"unknown coding {algorithm!r}")


class Memo(NamedTuple):
    encoded: bytes
    size: int  # bytes held: identity key + encoded value


# --- metrics -----------------------------------------------------------------------------------


class Store:
    """Compression counters as plain integers (event loop only), families made on scrape."""

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.responses: dict[str, int] = {}
        self.memo = {"hit": 0, "miss": 0}

    def collect(self) -> Iterator[Metric]:
        size = CounterMetricFamily(
            "compression_bytes_total",
            "Response body bytes compressed: identity bytes in, encoded bytes out.",
            labels=["direction"],
        )
        size.add_metric(["in"], self.bytes_in)
        size.add_metric(["out"], self.bytes_out)
        yield size
        responses = CounterMetricFamily(
            "compression_responses_total", "Responses compressed, by coding.", labels=["encoding"]
        )
        for alg in ALGORITHMS:
            responses.add_metric([alg], self.responses.get(alg, 0))
        yield responses
        memo = CounterMetricFamily(
            "compression_memo_total",
            "Encoded-body memo lookups: hit (no compression needed) or miss.",
            labels=["result"],
        )
        for result, n in self.memo.items():
            memo.add_metric([result], n)
        yield memo


def _define() -> Store:
    from addons.metrics import REGISTRY

    store = Store()
    REGISTRY.register(store)
    return store


# One store per process, registered once on the registry the management app serves, however
# often `-s addons/compress.py` is reloaded.
STORE = once("compress.store", _define)


# --- the addon ---------------------------------------------------------------------------------


class Settings(NamedTuple):
    enabled: bool
    algorithms: tuple[str, ...]
    levels: dict[str, int]
    min_size: int
    content_types: re.Pattern[str]
    offload_threshold: int
    memo_size: int


def parse_settings(
    enabled: bool,
    algorithms: Sequence[str],
    levels: dict[str, int],
    min_size: str,
    content_types: Sequence[str],
    offload_threshold: str,
    memo_size: str,
) -> Settings:
    """The options as Settings; `OptionsError` naming the option when one is invalid."""
    algs = _codings(algorithms, levels)
    min_bytes = size("compress_min_size", min_size)
    offload_bytes = size("compress_offload_threshold", offload_threshold)
    memo_bytes = size("compress_memo_size", memo_size)
    try:
        types = compile_content_types(content_types)
    except ValueError as e:
        raise exceptions.OptionsError(f"compress_content_types: {e}") from None
    return Settings(
        enabled=enabled,
        algorithms=algs,
        levels=dict(levels),
        min_size=min_bytes,
        content_types=types,
        offload_threshold=offload_bytes,
        memo_size=memo_bytes,
    )


def _codings(algorithms: Sequence[str], levels: dict[str, int]) -> tuple[str, ...]:
    """`compress_algorithms` lowercased, each known and listed once, and every level in range."""
    algs = [a.strip().lower() for a in algorithms]
    bad = [a for a in algs if a not in ALGORITHMS]
    if bad:
        raise exceptions.OptionsError(
            f"compress_algorithms: unknown coding {bad[0]!r} (use {', '.join(ALGORITHMS)})"
        )
    if len(set(algs)) != len(algs):
        raise exceptions.OptionsError("compress_algorithms: a coding is listed twice")
    for alg, level in levels.items():
        low, high = LEVEL_RANGES[alg]
        if not low <= level <= high:
            raise exceptions.OptionsError(f"compress_{alg}_level: {level} is outside {low}-{high}")
    return tuple(algs)


class Compress:
    def __init__(self) -> None:
        self.s = parse_settings(
            True,
            DEFAULT_ALGORITHMS,
            DEFAULT_LEVELS,
            DEFAULT_MIN_SIZE,
            DEFAULT_CONTENT_TYPES,
            DEFAULT_OFFLOAD_THRESHOLD,
            DEFAULT_MEMO_SIZE,
        )
        self._negotiated: dict[str, str | None] = {}
        self._types: dict[str, bool] = {}
        self.memo: LRUCache[tuple[str, bytes], Memo] = self._new_memo()

    def _new_memo(self) -> LRUCache[tuple[str, bytes], Memo]:
        return LRUCache(maxsize=max(self.s.memo_size, 1), getsizeof=lambda m: m.size)

    def load(self, loader: Any) -> None:
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        if not any(name.startswith("compress_") for name in updated):
            return
        o = ctx.options
        s = parse_settings(
            o.compress_enabled,
            o.compress_algorithms,
            {alg: getattr(o, f"compress_{alg}_level") for alg in ALGORITHMS},
            o.compress_min_size,
            o.compress_content_types,
            o.compress_offload_threshold,
            o.compress_memo_size,
        )
        self.s = s
        log.debug(
            "compression %s: %s",
            "on" if s.enabled else "off",
            ", ".join(f"{a} {s.levels[a]}" for a in s.algorithms),
        )
        self._negotiated = {}
        self._types = {}
        self.memo = self._new_memo()

    def _type_allowed(self, content_type: bytes) -> bool:
        ok = self._types.get(content_type)
        if ok is None:
            if len(self._types) >= _MEMO_MAX_KEYS:
                self._types.clear()
            mt = media_type(content_type.decode("latin-1"))
            ok = self._types[content_type] = self.s.content_types.fullmatch(mt) is not None
        return ok

    def _negotiate(self, accept: str | None) -> str | None:
        if accept is None:
            return None
        try:
            return self._negotiated[accept]
        except KeyError:
            pass
        if len(self._negotiated) >= _MEMO_MAX_KEYS:
            self._negotiated.clear()
        chosen = self._negotiated[accept] = negotiate(accept, self.s.algorithms)
        return chosen

    def response(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        # Sync on purpose: mitmproxy awaits a returned coroutine, so only responses compressed
        # in a worker thread pay for a coroutine.
        resp = flow.response
        if resp is None or flow.error or not flow.live or flow.websocket or not self.s.enabled:
            return None
        req = flow.request
        if resp.status_code == 304:
            self._not_modified(req, resp)
            return None
        body = resp.raw_content
        if (
            precheck(req.method, resp.status_code, body, bool(resp.stream), self.s.min_size)
            or body is None
        ):
            return None
        found = scan(resp.headers.fields, RESPONSE_FIELDS)
        asked = scan(req.headers.fields, REQUEST_FIELDS)
        if header_check(found, joined(asked, b"cache-control"), self._type_allowed):
            return None
        alg = self._negotiate(joined(asked, b"accept-encoding"))
        if alg is None:
            _vary_only(resp, found.get(b"vary"))
            return None
        return self._encode(flow, resp, body, alg)

    def _encode(
        self, flow: http.HTTPFlow, resp: http.Response, body: bytes, alg: str
    ) -> Coroutine[Any, Any, None] | None:
        """Encode `body` with `alg`: from the memo, inline, or (big bodies) in a worker thread,
        whose coroutine is returned for mitmproxy to await."""
        if self.s.memo_size:
            hit = self.memo.get((alg, body))
            if hit is not None:
                STORE.memo["hit"] += 1
                self._apply(flow, resp, body, hit.encoded, alg)
                return None
            STORE.memo["miss"] += 1
        if len(body) >= self.s.offload_threshold:
            return self._offload(flow, resp, body, alg)
        self._finish(flow, resp, body, compress(alg, self.s.levels[alg], body), alg)
        return None

    def _not_modified(self, req: http.Request, resp: http.Response) -> None:
        found = scan(resp.headers.fields, _ETAG)
        if b"etag" not in found:
            return
        inm = joined(scan(req.headers.fields, _IF_NONE_MATCH), b"if-none-match")
        weak = etag_for_304(joined(found, b"etag"), inm)
        if weak is None:
            return
        fields = [(k, v) for k, v in resp.headers.fields if k.lower() != b"etag"]
        fields.append((b"ETag" if _names(resp) is _H1_NAMES else b"etag", weak.encode("latin-1")))
        resp.headers.fields = tuple(fields)
        vary = merge_vary(resp.headers.get_all("vary"))
        if vary is not None:
            resp.headers[_names(resp)[2].decode()] = vary

    async def _offload(
        self, flow: http.HTTPFlow, resp: http.Response, body: bytes, alg: str
    ) -> None:
        encoded = await asyncio.to_thread(compress, alg, self.s.levels[alg], body)
        self._finish(flow, resp, body, encoded, alg)

    def _finish(
        self, flow: http.HTTPFlow, resp: http.Response, body: bytes, encoded: bytes, alg: str
    ) -> None:
        if self.s.memo_size:
            size = len(body) + len(encoded)
            if size <= self.s.memo_size:
                self.memo[(alg, body)] = Memo(encoded, size)
        self._apply(flow, resp, body, encoded, alg)

    def _apply(
        self, flow: http.HTTPFlow, resp: http.Response, body: bytes, encoded: bytes, alg: str
    ) -> None:
        chunked = False
        vary: list[str] = []
        fields = []
        for name, value in resp.headers.fields:
            lname = name.lower()
            if lname in (b"content-length", b"content-encoding", b"accept-ranges"):
                continue
            if lname == b"vary":
                vary.append(value.decode("latin-1"))
                continue
            if lname == b"etag":
                value = weaken_etag(value.decode("latin-1")).encode("latin-1")
            elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            fields.append((name, value))
        ce_name, cl_name, vary_name = _names(resp)
        fields.append((ce_name, alg.encode()))
        if not chunked:  # chunked framing carries the length (RFC 9112 §6.3)
            fields.append((cl_name, str(len(encoded)).encode()))
        merged = merge_vary(vary)
        fields.append((vary_name, (merged if merged is not None else ", ".join(vary)).encode()))
        resp.headers.fields = tuple(fields)
        resp.raw_content = encoded
        st = STORE
        st.bytes_in += len(body)
        st.bytes_out += len(encoded)
        st.responses[alg] = st.responses.get(alg, 0) + 1
        record(flow)["compression"] = alg


_H1_NAMES = (b"Content-Encoding", b"Content-Length", b"Vary")
_H2_NAMES = (b"content-encoding", b"content-length", b"vary")


def _vary_only(resp: http.Response, before: list[bytes] | None) -> None:
    """`Vary: Accept-Encoding` on a response left as it is, for caches downstream."""
    if before is None:
        resp.headers.fields = (*resp.headers.fields, (_names(resp)[2], b"Accept-Encoding"))
        return
    vary = merge_vary([v.decode("latin-1") for v in before])
    if vary is not None:
        resp.headers[_names(resp)[2].decode()] = vary


def _names(resp: http.Response) -> tuple[bytes, bytes, bytes]:
    # HTTP/2 and 3 field names are lowercase; mitmproxy would lowercase them itself, logging a
    # line per response.
    return _H1_NAMES if resp.data.http_version.startswith(b"HTTP/1") else _H2_NAMES


addons = [Compress()]
