"""Host names and host patterns: one grammar, IDNA-normalised, one suffix matcher.

- `normalise`: a name as every matcher keys it (lowercase, no trailing dot, IDNA A-labels);
  `host_key`: the same for a flow's host, cheap for the ASCII names nearly all hosts are.
- `ip_literal`: the address when a host is an IP literal, as the resolver reads it.
- `parse_pattern` / `parse_patterns`: `example.com` (that name), `*.example.com` (every
  subdomain at any depth, not `example.com` itself), an IP address, and where the caller allows
  it `*` (every host); `ValueError` naming the pattern otherwise.
- `Pattern.matches`: one pattern against a host key (an ordered rule list: first match wins).
- `HostIndex` / `build_index`: many patterns, looked up at a cost that depends on the host's
  number of labels, never on the number of patterns.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Generic, NamedTuple, TypeVar

import idna

V = TypeVar("V")

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalise(name: str) -> str:
    """`name` as the matchers key it: lowercase, no trailing dot, IDNA A-labels.

    ValueError when it is not a host name (RFC 1123 labels, plus `_`, which real lists use).
    """
    host = name.strip().rstrip(".")
    if not host.isascii():
        try:
            # UTS #46 mapping, as browsers do: full-width dots, case, compatibility forms.
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"{name!r} is not a valid internationalised name ({e})") from None
    host = host.lower()
    if len(host) > 253 or not _NAME.fullmatch(host):
        raise ValueError(f"{name!r} is not a host name")
    return host


def host_key(host: str) -> str:
    """The lookup key of a host from a flow: cheap for ASCII names, which is nearly all of them."""
    if host.isascii():
        return host.lower().rstrip(".")
    try:
        return normalise(host)
    except ValueError:
        return host.lower().rstrip(".")


def ip_literal(host: str) -> IPAddress | None:
    """The address when `host` is an IP literal, including the legacy IPv4 forms that
    getaddrinfo accepts (`127.1`, `0x7f.0.0.1`): a name whose last label is numeric is an
    address to the resolver, never a DNS name."""
    if not host:
        return None
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.strip("[]").partition("%")[0])
        except ValueError:
            return None
    last = host.rpartition(".")[2]
    if not (last.isdigit() or last.startswith("0x")):
        return None
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


# --- patterns ----------------------------------------------------------------------------------


class Pattern(NamedTuple):
    name: str  # a normalised name or IP address; "" with wildcard for `*`
    wildcard: bool  # *.name: every subdomain of name at any depth, not name itself

    def __str__(self) -> str:
        if not self.wildcard:
            return self.name
        return f"*.{self.name}" if self.name else "*"

    def matches(self, host: str) -> bool:
        """Whether `host` (a `host_key`) is covered; the same answer `HostIndex.match` gives."""
        name = self.name
        if not self.wildcard:
            return host == name
        if not name:
            return True
        n = len(name)
        return len(host) > n and host[-n - 1] == "." and host.endswith(name)


EVERY_HOST = Pattern("", True)


def parse_pattern(text: str, star: bool = False) -> Pattern:
    """`example.com`, `*.example.com`, an IP address, or (`star`) `*`; ValueError naming it."""
    spec = text.strip()
    try:
        if spec == "*" and star:
            return EVERY_HOST
        if spec.startswith("*."):
            base = spec[2:]
            if "*" in base:
                raise ValueError("only a leading *. wildcard is supported")
            return Pattern(normalise(base), True)
        if "*" in spec:
            raise ValueError("only a leading *. wildcard is supported")
        ip = ip_literal(spec)
        if ip is not None:
            return Pattern(str(ip), False)
        return Pattern(normalise(spec), False)
    except ValueError as e:
        allowed = "api.example.com, *.example.com, an IP address" + (" or *" if star else "")
        raise ValueError(f"{text!r} is not a host pattern: {e} (use {allowed})") from None


def parse_patterns(specs: Iterable[str], star: bool = False) -> list[Pattern]:
    return [parse_pattern(spec, star) for spec in specs]


# --- the suffix index ----------------------------------------------------------------------------


class Match(NamedTuple, Generic[V]):
    value: V  # what the pattern was added with (a rule id)
    pattern: str  # the pattern that matched (`*.ads.example.com`), for logs and the client


class HostIndex(Generic[V]):
    """Exact names and wildcard suffixes, each in a dict keyed by the name, plus `*`.

    A lookup probes the exact dict once and the suffix dict once per label of the host, so its
    cost depends on the host's depth, not on how many patterns were added. The most specific
    pattern wins: the exact name, then the longest suffix, then `*`.
    """

    __slots__ = ("everything", "exact", "suffixes")

    def __init__(self) -> None:
        self.exact: dict[str, V] = {}
        self.suffixes: dict[str, V] = {}
        self.everything: V | None = None

    def add(self, pattern: Pattern, value: V) -> None:
        # The first pattern added keeps its value (a filter's inline entries before its files).
        if pattern.wildcard and not pattern.name:
            if self.everything is None:
                self.everything = value
            return
        (self.suffixes if pattern.wildcard else self.exact).setdefault(pattern.name, value)

    def __len__(self) -> int:
        return len(self.exact) + len(self.suffixes) + (self.everything is not None)

    def match(self, host: str) -> Match[V] | None:
        value = self.exact.get(host)
        if value is not None:
            return Match(value, host)
        suffixes = self.suffixes
        if suffixes:
            dot = host.find(".")
            while dot != -1:
                parent = host[dot + 1 :]
                value = suffixes.get(parent)
                if value is not None:
                    return Match(value, "*." + parent)
                dot = host.find(".", dot + 1)
        if self.everything is not None:
            return Match(self.everything, "*")
        return None


def build_index(patterns: Iterable[Pattern], value: str | None = None) -> HostIndex[str]:
    """An index of `patterns`, all under `value`, or (value None) each under its own text."""
    idx: HostIndex[str] = HostIndex()
    for p in patterns:
        idx.add(p, value if value is not None else str(p))
    return idx
