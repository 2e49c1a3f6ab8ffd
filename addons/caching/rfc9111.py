"""RFC 9111 (HTTP caching) decisions for a shared cache: pure functions over plain values.

No mitmproxy, no clock of its own: headers come in as lists of `(name, value)` str pairs or
as already-parsed values, times as POSIX seconds passed by the caller. The cache package
(`addons/caching/`) is the only user; everything here is tested by tables in
`tests/unit/test_rfc9111.py`.

    parse_http_date(value) -> float | None           RFC 9110 §5.6.7, strictly
    parse_cache_control(values) -> Directives        RFC 9111 §5.2 (+ RFC 5861)
    storable(...) -> str | None                      RFC 9111 §3 (None: storable, else why not)
    freshness_lifetime(...) -> (seconds, heuristic)  RFC 9111 §4.2.1, §4.2.2
    initial_age(...) -> seconds                      RFC 9111 §4.2.3 (corrected_initial_age)
    reuse(...) -> Reuse                              RFC 9111 §4, §4.2.4, §5.2.1, RFC 5861
    stored_fields / merge_304                        RFC 9111 §3.1, §3.2, §4.3.4
    not_modified(...)                                RFC 9110 §13.1.2/§13.1.3 via RFC 9111 §4.3.2
    targeted_directives(get, device)                 RFC 9213 CDN-Cache-Control, Surrogate-Control
    byte_range / if_range_holds                      RFC 9110 §14.2, §13.1.5
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import NamedTuple

Fields = Sequence[tuple[str, str]]

# RFC 9110 §15.1: statuses that are heuristically cacheable.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# Statuses whose caching semantics this cache implements (for must-understand, §5.2.2.3).
# 206 is left out on purpose: the cache does not combine or serve partial content.
UNDERSTOOD_STATUSES = frozenset(
    {200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501}
)
# RFC 9110 §7.6.1 hop-by-hop fields, plus fields that describe one transfer or one request
# (RFC 9111 §3.1); the cache regenerates Age and Content-Length itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
        "proxy-authenticate",
        "proxy-authentication-info",
    }
)
NOT_STORED = HOP_BY_HOP | {"age", "content-length", "x-request-id", "x-cache-status"}
# RFC 9111 §3.2: a 304 updates the stored fields except these. Besides Content-Length, the
# fields that describe the stored body and its identity: a 304 cannot change the body, so a
# differing Content-Encoding, Content-Range, Content-MD5 or ETag in it would mislabel the
# body we keep (cache-tests.fyi's update304 group asks the same).
NOT_UPDATED = NOT_STORED | {"content-encoding", "content-range", "content-md5", "etag"}
# RFC 9111 §1.2.2: delta-seconds beyond this are taken as this.
MAX_DELTA = 2147483648
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Status codes on which stale-if-error may answer instead (RFC 5861 §4).
ERROR_STATUSES = frozenset({500, 502, 503, 504})

# --- HTTP-date (RFC 9110 §5.6.7) ---------------------------------------------------------

_MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}
_DAYS = "Mon|Tue|Wed|Thu|Fri|Sat|Sun"
_LONG_DAYS = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"
_MON = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec"
_TIME = r"(\d\d):(\d\d):(\d\d)"
_IMF = re.compile(rf"(?:{_DAYS}), (\d\d) ({_MON}) (\d{{4}}) {_TIME} GMT")
_RFC850 = re.compile(rf"(?:{_LONG_DAYS}), (\d\d)-({_MON})-(\d\d) {_TIME} GMT")
_ASCTIME = re.compile(rf"(?:{_DAYS}) ({_MON}) ( \d|\d\d) {_TIME} (\d{{4}})")


@lru_cache(maxsize=4096)
def parse_http_date(value: str) -> float | None:
    """POSIX seconds of an HTTP-date, or None when it is not one of the three formats.

    Strict on purpose (unlike `email.utils.parsedate`): anything but IMF-fixdate, RFC 850 or
    asctime is invalid, and so are impossible dates and times. RFC 850's two-digit years
    are read in the window 1970-2069 (RFC 9110 asks for "not more than 50 years ahead",
    which this matches until 2019+50; the format is obsolete since 1995).
    """
    value = value.strip(" \t")
    if m := _IMF.fullmatch(value):
        day, mon, year, hh, mm, ss = m.groups()
    elif m := _RFC850.fullmatch(value):
        day, mon, yy, hh, mm, ss = m.groups()
        year = str(1900 + int(yy) if int(yy) >= 70 else 2000 + int(yy))
    elif m := _ASCTIME.fullmatch(value):
        mon, day, hh, mm, ss, year = m.groups()
    else:
        return None
    d, h, mi, s, y = int(day), int(hh), int(mm), int(ss), int(year)
    month = _MONTHS[mon]
    if not (1 <= d <= calendar.monthrange(y, month)[1] and h < 24 and mi < 60 and s <= 60):
        return None
    return float(calendar.timegm((y, month, d, h, mi, min(s, 59), 0, 0, 0)))


def format_http_date(ts: float) -> str:
    """IMF-fixdate for `ts`."""
    from email.utils import formatdate

    return formatdate(ts, usegmt=True)


# --- Cache-Control (RFC 9111 §5.2) -------------------------------------------------------


class Directives(dict[str, str | None]):
    """Cache-Control directives by lower-cased name; value None for a bare directive.

    The first occurrence of a directive wins (RFC 9111 §4.2.1 allows "the first"), unknown
    directives are kept and ignored by the decisions (§5.2.3).
    """

    def seconds(self, name: str) -> int | None:
        """A delta-seconds argument; absent: None; invalid: 0 (so the response is stale)."""
        if name not in self:
            return None
        return delta_seconds(self[name])

    def fields(self, name: str) -> frozenset[str]:
        """The field names of a qualified `no-cache="..."` or `private="..."`."""
        value = self.get(name)
        if not value:
            return frozenset()
        return frozenset(f.strip().lower() for f in value.split(",") if f.strip())


_DIRECTIVE = re.compile(
    r"""[\s,]*([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?:\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s"]*)))?\s*"""
)


@lru_cache(maxsize=4096)
def _parse_one(value: str) -> tuple[tuple[str, str | None], ...]:
    out: list[tuple[str, str | None]] = []
    pos, n = 0, len(value)
    while pos < n:
        m = _DIRECTIVE.match(value, pos)
        if not m or m.end() == pos:
            # Garbage: skip to the next comma outside quotes and carry on.
            pos = _next_comma(value, pos) + 1
            continue
        name, quoted, token = m.groups()
        arg = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else token
        out.append((name.lower(), arg))
        pos = m.end()
        if pos < n and value[pos] != ",":
            pos = _next_comma(value, pos) + 1
    return tuple(out)


def _next_comma(value: str, pos: int) -> int:
    quoted = False
    while pos < len(value):
        c = value[pos]
        if c == '"':
            quoted = not quoted
        elif c == "\\" and quoted:
            pos += 1
        elif c == "," and not quoted:
            return pos
        pos += 1
    return len(value)


def parse_cache_control(values: Iterable[str]) -> Directives:
    """All `Cache-Control` field lines of a message as one set of directives."""
    out = Directives()
    for value in values:
        for name, arg in _parse_one(value):
            out.setdefault(name, arg)
    return out


def delta_seconds(value: str | None) -> int:
    """RFC 9111 §1.2.2 delta-seconds; invalid (missing, signed, not digits) is 0."""
    if not value or not value.isdigit() or not value.isascii():
        return 0
    return min(int(value), MAX_DELTA)


def parse_age(values: Sequence[str]) -> int:
    """RFC 9111 §5.1: the first member of the first Age line; invalid ones are ignored (0)."""
    if not values:
        return 0
    first = values[0].split(",")[0].strip()
    if not first.isdigit() or not first.isascii():
        return 0
    return min(int(first), MAX_DELTA)


# --- targeted fields: CDN-Cache-Control (RFC 9213), Surrogate-Control ---------------------

# Edge Architecture Specification 1.0: `name[=value][;device]`, no whitespace around `=`.
_SURROGATE = re.compile(
    r"""([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?:=("(?:[^"\\]|\\.)*"|[^;,\s"]*))?(?:;([^\s,;"]+))?"""
)


def surrogate_directives(values: Iterable[str], device: str) -> Directives | None:
    """The `Surrogate-Control` directives for the surrogate named `device`, as Cache-Control
    directives; None when no valid directive is untargeted or targeted at it.

    Directives targeted at `device` win over untargeted ones. `max-age=N+M` is a lifetime
    of N and M more seconds of serving stale while the origin fails (`stale-if-error=M`).
    """
    mine, anyone = Directives(), Directives()
    device = device.lower()
    for value in values:
        for part in value.split(","):
            m = _SURROGATE.fullmatch(part.strip(" \t"))
            if m is None:
                continue
            name, arg, target = m.group(1).lower(), m.group(2), m.group(3)
            if target is not None and target.lower() != device:
                continue
            into = mine if target is not None else anyone
            if name == "max-age" and arg and "+" in arg:
                arg, _, extra = arg.partition("+")
                into.setdefault("stale-if-error", extra)
            into.setdefault(name, arg)
    return mine or anyone or None


def targeted_directives(get: Callable[[str], list[str]], device: str) -> Directives | None:
    """The directives that replace Cache-Control and Expires for a cache acting for the
    origin (RFC 9213 §2.2): CDN-Cache-Control when it has any, else Surrogate-Control's for
    `device`; None when neither applies."""
    cdn = parse_cache_control(get("cdn-cache-control"))
    if cdn:
        return cdn
    surrogate = get("surrogate-control")
    return surrogate_directives(surrogate, device) if surrogate else None


# --- storing (RFC 9111 §3) ---------------------------------------------------------------


def storable(
    method: str,
    status: int,
    req_cc: Directives,
    resp_cc: Directives,
    has_authorization: bool,
    has_expires: bool,
    vary: frozenset[str],
    heuristic_allowed: bool = True,
) -> str | None:
    """None when a shared cache may store the response, else the reason it may not."""
    if method != "GET":
        return "method"
    if "must-understand" in resp_cc:
        # §5.2.2.3: with must-understand, only statuses we implement are stored, and then
        # no-store is overridden.
        if status not in UNDERSTOOD_STATUSES:
            return "must-understand"
    elif "no-store" in resp_cc:
        return "no-store"
    if status < 200 or status in (206, 304):
        return "status"
    if "no-store" in req_cc:
        return "request no-store"
    if "private" in resp_cc and not resp_cc.fields("private"):
        return "private"
    if (
        has_authorization
        and "public" not in resp_cc
        and "s-maxage" not in resp_cc
        and "must-revalidate" not in resp_cc
    ):
        return "authorization"  # §3.5
    if "*" in vary:
        return "vary *"  # §4.1: never matches a later request
    explicit = (
        "public" in resp_cc
        or "max-age" in resp_cc
        or "s-maxage" in resp_cc
        or has_expires
        or "no-cache" in resp_cc  # stored to be revalidated each time (§5.2.2.4)
    )
    if not explicit and not (heuristic_allowed and status in HEURISTIC_STATUSES):
        return "no freshness"
    return None


def stored_fields(fields: Fields, resp_cc: Directives) -> list[tuple[str, str]]:
    """The response fields a shared cache keeps (RFC 9111 §3.1, §5.2.2.4, §5.2.2.7)."""
    drop = set(NOT_STORED)
    for name, value in fields:
        if name.lower() == "connection":
            drop.update(t.strip().lower() for t in value.split(",") if t.strip())
    drop |= resp_cc.fields("private") | resp_cc.fields("no-cache")
    return [(n, v) for n, v in fields if n.lower() not in drop]


def merge_304(stored: Fields, fresh: Fields) -> list[tuple[str, str]]:
    """Stored fields updated by a 304's (RFC 9111 §3.2): its fields replace stored ones of
    the same name, except those in NOT_UPDATED and the fields never stored."""
    drop = set(NOT_UPDATED)
    for name, value in fresh:
        if name.lower() == "connection":
            drop.update(t.strip().lower() for t in value.split(",") if t.strip())
    new = [(n, v) for n, v in fresh if n.lower() not in drop]
    replaced = {n.lower() for n, _ in new}
    return [(n, v) for n, v in stored if n.lower() not in replaced] + new


# --- freshness (RFC 9111 §4.2) ------------------------------------------------------------


def freshness_lifetime(
    resp_cc: Directives,
    status: int,
    date: float | None,
    expires: Sequence[str],
    last_modified: float | None,
    response_time: float,
    heuristic_max: float,
    default_ttl: float | None = None,
) -> tuple[float, bool]:
    """(freshness lifetime in seconds, whether it is heuristic).

    §4.2.1 order: s-maxage (shared cache), max-age, Expires minus Date. Without them, a
    heuristically cacheable status (or `public`) gets 10% of the time since Last-Modified,
    at most `heuristic_max` (§4.2.2), or `default_ttl` when given and there is no
    Last-Modified (Waypost's `default_ttl` mode).
    """
    if "s-maxage" in resp_cc:
        return float(resp_cc.seconds("s-maxage") or 0), False
    if "max-age" in resp_cc:
        return float(resp_cc.seconds("max-age") or 0), False
    if expires:
        # An invalid Expires (e.g. "0") means already expired (§5.3); so do several values.
        exp = parse_http_date(expires[0]) if len(expires) == 1 else None
        if exp is None:
            return 0.0, False
        return max(0.0, exp - (date if date is not None else response_time)), False
    if status not in HEURISTIC_STATUSES and "public" not in resp_cc:
        return 0.0, True
    base = date if date is not None else response_time
    if last_modified is not None and last_modified <= base:
        return min((base - last_modified) / 10, heuristic_max), True
    if default_ttl is not None:
        return default_ttl, True
    return 0.0, True


def initial_age(
    age_value: int, date: float | None, request_time: float, response_time: float
) -> float:
    """RFC 9111 §4.2.3 corrected_initial_age; current age = this + (now - response_time)."""
    date_value = date if date is not None else response_time
    apparent_age = max(0.0, response_time - date_value)
    response_delay = max(0.0, response_time - request_time)
    return max(apparent_age, age_value + response_delay)


class Reuse(NamedTuple):
    """What to do with a stored response for a request.

    action: "fresh" serve it; "stale" serve it stale (max-stale or stale-while-revalidate,
    which then also asks for a revalidation); "revalidate" ask the origin conditionally.
    """

    action: str
    swr: bool = False


def reuse(
    age: float,
    lifetime: float,
    req_cc: Directives,
    no_cache: bool,
    must_revalidate: bool,
    stale_while_revalidate: int,
    forced_stale: bool = False,
) -> Reuse:
    """RFC 9111 §4 and §5.2.1 with RFC 5861: may a stored response answer this request?"""
    if no_cache or "no-cache" in req_cc or forced_stale:
        return Reuse("revalidate")  # §5.2.2.4 / §5.2.1.4 / soft purge
    max_age = req_cc.seconds("max-age")
    if max_age is not None and age > max_age:
        return Reuse("revalidate")  # §5.2.1.1
    if lifetime > age:
        min_fresh = req_cc.seconds("min-fresh")
        if min_fresh is not None and lifetime - age < min_fresh:
            return Reuse("revalidate")  # §5.2.1.3
        return Reuse("fresh")
    if must_revalidate:
        return Reuse("revalidate")  # §5.2.2.2 / §5.2.2.8 / s-maxage implies proxy-revalidate
    staleness = age - lifetime
    if "max-stale" in req_cc:
        arg = req_cc["max-stale"]
        limit = float("inf") if arg is None else delta_seconds(arg)
        if staleness <= limit:
            return Reuse("stale")  # §5.2.1.2
    if stale_while_revalidate and staleness <= stale_while_revalidate:
        return Reuse("stale", swr=True)  # RFC 5861 §3
    return Reuse("revalidate")


def stale_if_error(
    age: float,
    lifetime: float,
    resp_cc: Directives,
    req_cc: Directives,
    must_revalidate: bool,
    disconnected: bool = False,
) -> bool:
    """RFC 5861 §4: may a stale stored response answer instead of an origin error?

    `disconnected`: the origin could not be reached or failed before a complete response, and
    the operator allows stale answers then whatever stale-if-error says (RFC 9111 §4.2.4: a
    disconnected cache may serve stale unless a directive forbids it, as no-cache does).
    """
    if must_revalidate:
        return False
    if disconnected and not ("no-cache" in resp_cc and not resp_cc.fields("no-cache")):
        return True
    staleness = age - lifetime
    limits = [d.seconds("stale-if-error") for d in (req_cc, resp_cc) if "stale-if-error" in d]
    return any(staleness <= (lim or 0) for lim in limits)


# --- validators (RFC 9110 §8.8, §13.1) -------------------------------------------------------


def etag_list(value: str) -> list[str]:
    """Entity tags of an If-None-Match value, `*` kept as is."""
    return [t for t in re.findall(r'\*|(?:W/)?"[^"]*"', value)]


def weak_match(a: str, b: str) -> bool:
    return a.removeprefix("W/") == b.removeprefix("W/")


def not_modified(
    if_none_match: str | None,
    if_modified_since: str | None,
    etag: str | None,
    last_modified: float | None,
) -> bool:
    """Whether the stored response makes the client's conditional GET/HEAD a 304."""
    if if_none_match is not None:
        # §13.1.2 weak comparison; If-Modified-Since is then ignored (§13.1.3).
        tags = etag_list(if_none_match)
        if "*" in tags:
            return True
        return etag is not None and any(weak_match(t, etag) for t in tags)
    if if_modified_since is not None and last_modified is not None:
        since = parse_http_date(if_modified_since)
        return since is not None and last_modified <= since
    return False


def fields_of_304(fields: Fields) -> list[tuple[str, str]]:
    """Fields a 304 answered from the cache carries (RFC 9110 §15.4.5)."""
    keep = {"cache-control", "content-location", "date", "etag", "expires", "vary", "last-modified"}
    return [(n, v) for n, v in fields if n.lower() in keep]


# --- ranges (RFC 9110 §14) ----------------------------------------------------------------

_BYTE_RANGE = re.compile(r"bytes[ \t]*=[ \t]*(\d*)-(\d*)[ \t]*", re.IGNORECASE)


def byte_range(value: str, length: int) -> tuple[int, int] | None | bool:
    """The one byte range a `Range` value selects from a body of `length` bytes, as
    (first, last) inclusive; False when it is unsatisfiable (416); None when the field is to
    be ignored and the whole body sent (§14.2: invalid, several ranges, other units)."""
    m = _BYTE_RANGE.fullmatch(value)
    if m is None:
        return None
    first, last = m.groups()
    if not first:
        if not last:
            return None
        suffix = int(last)  # the final `suffix` bytes (§14.1.2)
        if suffix == 0:
            return False
        return (max(0, length - suffix), length - 1) if length else False
    start = int(first)
    end = int(last) if last else length - 1
    if last and end < start:
        return None  # invalid range-spec: ignore the field
    if start >= length:
        return False
    return start, min(end, length - 1)


def if_range_holds(value: str, etag: str | None, last_modified: str | None) -> bool:
    """RFC 9110 §13.1.5: a strong ETag match or an exactly equal Last-Modified date."""
    value = value.strip()
    if value.startswith(('"', "W/")):
        return etag is not None and not etag.startswith("W/") and value == etag
    return last_modified is not None and value == last_modified.strip()


# --- Vary (RFC 9111 §4.1) -----------------------------------------------------------------


def vary_names(values: Iterable[str]) -> frozenset[str]:
    return frozenset(t.strip().lower() for value in values for t in value.split(",") if t.strip())


_WS = re.compile(r"[ \t]*,[ \t]*|[ \t]+")


def normalise_vary_value(values: Sequence[str]) -> str:
    """One request field's value for Vary matching: lines joined, whitespace normalised
    (§4.1 allows it)."""
    return _WS.sub(lambda m: "," if "," in m.group() else " ", ",".join(values)).strip(" \t")
