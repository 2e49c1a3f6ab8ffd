"""Cache keys and eligibility (pure): what a request is looked up and stored under.

- Key: SHA-256 over the method, the normalised URL (scheme and host lower case,
  default port dropped, percent-encoding normalised, query parameters sorted) and the
  request's values of the fields the response's `Vary` names.
- Eligibility globs (`cache_patterns`, purge patterns) match the whole URL, its host or its
  path with the query.
- The request fields the cache looks at are found in one pass over the raw fields.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from urllib.parse import SplitResult, urlsplit

from addons.caching import rfc9111 as rfc

_PCT = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _pct(m: re.Match[str]) -> str:
    byte = int(m.group()[1:], 16)
    return chr(byte) if byte in _UNRESERVED else m.group().upper()


@lru_cache(maxsize=8192)
def normalise_target(target: str) -> str:
    """Path and query of a request target, normalised: percent-encoding of unreserved
    characters decoded and the rest upper-cased (RFC 3986 §6.2.2), query parameters sorted
    and empty parameters dropped."""
    path, sep, query = target.partition("?")
    path = _PCT.sub(_pct, path) or "/"
    if not sep:
        return path
    params = sorted(_PCT.sub(_pct, p) for p in query.split("&") if p)
    return f"{path}?{'&'.join(params)}" if params else path


def normalise_url(scheme: str, host: str, port: int, target: str) -> str:
    scheme = scheme.lower()
    host = host.lower().rstrip(".")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    default = (scheme == "http" and port == 80) or (scheme == "https" and port == 443)
    authority = host if default else f"{host}:{port}"
    return f"{scheme}://{authority}{normalise_target(target)}"


def port_of(parts: SplitResult) -> int:
    """The port of a split URL, the scheme's default when absent or invalid."""
    try:
        port = parts.port
    except ValueError:
        port = None
    return port or (443 if parts.scheme == "https" else 80)


def cache_key(method: str, url: str, vary: Sequence[tuple[str, str]]) -> str:
    """SHA-256 over method, normalised URL and the Vary fields' request values."""
    h = hashlib.sha256(f"{method}\n{url}".encode("utf-8", "surrogateescape"))
    for name, value in vary:
        h.update(f"\n{name}:{value}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def compile_globs(patterns: Sequence[str]) -> re.Pattern[str] | None:
    """One regex for a list of globs (`*`, `?`, `[...]`), case-insensitive; None if empty."""
    if not patterns:
        return None
    return re.compile("|".join(fnmatch.translate(p) for p in patterns), re.IGNORECASE)


@lru_cache(maxsize=8192)
def pattern_matches(rx: re.Pattern[str] | None, url: str) -> bool:
    """Eligibility: the glob matches the whole URL, its host or its path (with query)."""
    if rx is None:
        return True
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return bool(rx.match(url) or rx.match(parts.hostname or "") or rx.match(path))


def getter(fields: Sequence[tuple[str, str]]) -> Callable[[str], list[str]]:
    """Values by lower-cased field name, from one pass over the fields."""
    by_name: dict[str, list[str]] = {}
    for n, v in fields:
        by_name.setdefault(n.lower(), []).append(v)

    def get(name: str) -> list[str]:
        return by_name.get(name, [])

    return get


# Request fields the cache looks at, found in one pass over the raw fields.
_REQUEST_FIELDS = frozenset(
    {
        b"host",
        b"cache-control",
        b"if-none-match",
        b"if-modified-since",
        b"range",
        b"if-range",
        b"upgrade",
        b"authorization",
    }
)


def scan_request(fields: Sequence[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    found: dict[bytes, list[bytes]] = {}
    for k, v in fields:
        lk = k.lower()
        if lk in _REQUEST_FIELDS:
            found.setdefault(lk, []).append(v)
    return found


@lru_cache(maxsize=8192)
def request_url(scheme: bytes, host: bytes, port: int, target: bytes) -> str:
    """The normalised URL of a request from its raw parts (`host` from Host/:authority, a
    port in it ignored: `port` is the request's)."""
    name = host.decode("utf-8", "surrogateescape")
    if name.startswith("["):
        name = name[: name.find("]") + 1]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return normalise_url(
        scheme.decode("ascii", "replace"),
        name,
        port,
        target.decode("utf-8", "surrogateescape"),
    )


def vary_values(
    fields: Sequence[tuple[bytes, bytes]], vary: tuple[str, ...]
) -> list[tuple[str, str]]:
    """(name, normalised request value) for each field a response varies on."""
    if not vary:
        return []
    get = getter([(k.decode("latin-1"), v.decode("latin-1")) for k, v in fields])
    # §4.1: an absent field matches only an absent one (not an empty one); NUL cannot occur
    # in a field value, so it marks absence.
    return [
        (name, rfc.normalise_vary_value(values) if (values := get(name)) else "\x00")
        for name in vary
    ]
